#!/usr/bin/env python
"""Write the initial weights of an OV3 model as a universal checkpoint folder (layout-independent).

Any tensor/pipeline/data-parallel layout can then start from exactly these weights with
``--init-universal DIR``; the parallel-equivalence tests use it to start every layout from one init."""
import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=None, help="default: the size's registry value")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output", required=True, help="folder to write (universal/ layout)")
    args = p.parse_args(argv)
    import torch

    from megatron_ov3 import parallel
    from megatron_ov3.models import build_model, get_config
    from megatron_ov3.checkpointing.universal import save_universal

    parallel.initialize_model_parallel(1, 1, seed=args.seed)
    kw = {"image_size": args.image_size}
    if args.vocab_size:
        kw["vocab_size"] = args.vocab_size
    model = build_model(get_config(args.model_size, **kw))
    save_universal(model, args.output, {"iteration": 0, "consumed_samples": 0, "source": f"init seed {args.seed}",
                                        "model_config": model.cfg.to_dict()})
    print(f"wrote {args.output}/universal ({sum(p.numel() for p in model.parameters()):,} parameters)")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    exit_with(main)
