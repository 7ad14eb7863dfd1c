#!/usr/bin/env python
"""OV3 exports into RAE (bytetriper/RAE): register OV3 in an RAE checkout, and write a ready RAE stage-2 config.

  python tools/rae_handoff.py patch --rae ~/RAE            # once per checkout (idempotent)
  python tools/rae_stats.py --export ov3-export --data-path 'imagenet-train/{00000..01281}.tar'   # rae/stat.pt
  python tools/rae_handoff.py config --export ov3-export \\
      --base ~/RAE/configs/stage2/training/ImageNet256/DiTDH-XL_DINOv2-B.yaml --output ~/RAE/configs/ov3_B.yaml
  cd ~/RAE && torchrun --nproc_per_node 8 src/train.py --config configs/ov3_B.yaml ...   # RAE's own command
"""
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    patch = sub.add_parser("patch", help="copy rae_ov3.py + modeling_ov3.py into RAE's src/, register OV3")
    patch.add_argument("--rae", required=True, help="RAE checkout (or its src/)")
    cfg = sub.add_parser("config", help="RAE stage-2 config: --base with the export's stage-1 and DiT values")
    cfg.add_argument("--export", required=True, help="folder written by tools/convert_to_hf.py")
    cfg.add_argument("--base", required=True, help="an RAE stage-2 config (e.g. configs/stage2/training/...yaml)")
    cfg.add_argument("--output", required=True, help="config file to write")
    cfg.add_argument("--allow-missing-stats", action="store_true", help="write it before tools/rae_stats.py ran")
    args = p.parse_args(argv)
    from megatron_ov3.export import rae_handoff as R

    if args.command == "patch":
        done = R.patch_rae(os.path.expanduser(args.rae))
        print("\n".join(done) if done else f"{args.rae}: already patched")
        return
    import yaml

    settings = R.rae_settings(args.export)
    stats = settings["stage_1"]["params"]["normalization_stat_path"]
    if not os.path.isfile(stats) and not args.allow_missing_stats:
        raise UsageError(f"{stats} does not exist yet; run tools/rae_stats.py --export {args.export} --data-path ... "
                         f"(or pass --allow-missing-stats)")
    if not os.path.isfile(args.base):
        raise UsageError(f"--base {args.base!r} does not exist; give one of RAE's configs/stage2/*.yaml")
    try:
        base = yaml.safe_load(open(args.base)) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--base {args.base!r} is not YAML ({str(e).splitlines()[0]})") from None
    if os.path.exists(args.output):
        raise UsageError(f"--output {args.output!r} exists; choose a new file")
    with open(args.output, "w") as f:
        yaml.safe_dump(R.merge(base, settings), f, sort_keys=False)
    m = settings["misc"]
    print(f"wrote {args.output}: latent_size {m['latent_size']}, in_channels {m['latent_size'][0]}, "
          f"input_size {m['latent_size'][1]}, stats {stats}")


if __name__ == "__main__":
    exit_with(main)
