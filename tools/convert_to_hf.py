#!/usr/bin/env python
"""Export a megatron_ov3 checkpoint (any TP/PP layout) for downstream use, or import an open_clip OV3 one.

  --target hf         transformers folder: config.json, model.safetensors, image processor, vae/ (diffusers),
                      modeling code -> AutoModel.from_pretrained(dir, trust_remote_code=True), offline
  --target llava      the same folder; it carries llava_ov3_tower.py (see the README to register it)
  --target rae        the same folder; it carries rae_ov3.py (encoder + decoder) -- then tools/rae_stats.py
  --target open_clip  open_clip_config.json + open_clip_pytorch_model.bin (visual.* keys), like the release
  --import-open-clip DIR  open_clip OV3 folder -> universal checkpoint for --init-universal
"""
import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="megatron_ov3 checkpoint folder (with 'latest'), an iter_* or universal folder")
    src.add_argument("--import-open-clip", help="open_clip OV3 folder to import")
    p.add_argument("--target", default="hf", help="hf | llava | rae | open_clip")
    p.add_argument("--output", required=True)
    p.add_argument("--vae-path", default=None, help="local FLUX.1 VAE folder (default: the one training used)")
    p.add_argument("--model-size", default="custom", help="with --import-open-clip: size for the other towers")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from megatron_ov3.export import convert

    convert.require_empty(args.output)  # before any reading: the cheap check first
    if args.import_open_clip:
        out = convert.import_open_clip(args.import_open_clip, args.output, args.model_size)
        from megatron_ov3.checkpointing.universal import read_meta

        mc = read_meta(out)["model_config"]
        flags = "--class-token"
        if mc["position_embedding_type"] == "learned":
            flags += f" --position-embedding-type learned --pos-embed-ref-grid {mc['pos_embed_ref_grid']}"
        print(f"imported {args.import_open_clip} -> {out}; train from it with --init-universal {out} {flags} "
              f"(the official OV3 release was trained without a VAE shift: add --vae-shift-factor 0 for it)")
        return 0
    if args.target not in convert.TARGETS:
        raise UsageError(f"unknown --target {args.target!r}; choose one of {', '.join(convert.TARGETS)}")
    if args.target == "open_clip":
        out = convert.export_open_clip(args.load, args.output, progress=not args.no_progress)
    else:
        out = convert.export_hf(args.load, args.output, args.vae_path, progress=not args.no_progress)
    print(f"exported {args.load} -> {out} ({args.target})")
    return 0


if __name__ == "__main__":
    exit_with(main)
