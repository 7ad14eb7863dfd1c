#!/usr/bin/env python
"""Write the initial weights of an OV3 model as a universal checkpoint folder (layout-independent).

Any tensor/pipeline/data-parallel layout can then start from exactly these weights with
``--init-universal DIR``; the parallel-equivalence tests use it to start every layout from one init. The model
takes training's model flags (``--model-size``, ``--image-size``, ``--class-token``, ``--position-embedding-type``,
``--register-tokens``, ...) or a recipe's ``model:`` section (``--config``), so an exportable checkpoint (e.g.
the release-compatible encoder) can be made without training:

  python tools/init_checkpoint.py --model-size B --class-token --position-embedding-type learned --output init/
"""
import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, exit_with


def main(argv=None):
    from megatron_ov3.config import tree as T
    from megatron_ov3.models.config import OV3Config
    from megatron_ov3.models.vae import VAEConfig

    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a recipe (YAML/TOML): its model: section is used")
    p.add_argument("--vocab-size", type=int, default=None, help="default: the size's registry value")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", required=True, help="new or empty folder to write (universal/ layout), or an "
                   "earlier init_checkpoint output (its universal/ is replaced)")
    T.add_flags(p, "model", OV3Config, "model (training's flags)", defaults={"size": "tiny"})
    T.add_flags(p, "vae", VAEConfig, "frozen VAE (recorded for export and evaluation; optional)")
    args = p.parse_args(argv)

    from megatron_ov3 import parallel
    from megatron_ov3.checkpointing.universal import save_universal
    from megatron_ov3.config.job import resolve_model
    from megatron_ov3.models import build_model

    merged = T.merge({k: v for k, v in T.read_file(args.config).items() if k in ("model", "vae")}
                     if args.config else {}, T.cli_overrides(args))
    raw, vae = merged.get("model", {}), VAEConfig(**merged.get("vae", {}))
    if vae.tiny_vae or vae.vae_path:
        vae.validate()
    if args.vocab_size:
        raw = dict(raw, vocab_size=args.vocab_size)
    cfg = resolve_model(raw)
    from megatron_ov3.outputs import claim

    claim(args.output, "init_checkpoint", "--output")  # never into a run's checkpoint or another tool's folder
    parallel.initialize_model_parallel(1, 1, seed=args.seed)
    model = build_model(cfg)
    meta = {"iteration": 0, "consumed_samples": 0, "source": f"init seed {args.seed}",
            "model_config": model.cfg.to_dict()}
    if vae.tiny_vae or vae.vae_path:
        meta["vae"] = vae.checkpoint_meta()
    save_universal(model, args.output, meta)
    print(f"wrote {args.output}/universal ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0  # cli.run tears the process group down


if __name__ == "__main__":
    exit_with(main)
