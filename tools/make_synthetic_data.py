#!/usr/bin/env python
"""Write synthetic image-text shards (one to three coloured shapes; captions say how many, shape, colours, size,
position), classes.txt (the 24 colour x shape zero-shot classes, label i = line i) and templates.txt (prompt
templates in the captions' grammar, for evaluate.py --templates)."""
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--output-dir", required=True, help="new or empty folder, or an earlier make_synthetic_data "
                   "output (its files are replaced)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default="synthetic")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.samples_per_shard < 1 or args.image_size < 16:
        raise UsageError("--num-samples and --samples-per-shard must be >= 1 and --image-size >= 16")
    from megatron_ov3.data.synthetic import class_names, write_synthetic_shards, zero_shot_templates
    from megatron_ov3.outputs import claim

    claim(args.output_dir, "make_synthetic_data", "--output-dir")
    sizes = write_synthetic_shards(args.output_dir, args.num_samples, args.samples_per_shard, args.image_size,
                                   args.seed, args.prefix)
    with open(os.path.join(args.output_dir, "classes.txt"), "w") as f:
        f.write("\n".join(class_names()) + "\n")
    with open(os.path.join(args.output_dir, "templates.txt"), "w") as f:
        f.write("\n".join(zero_shot_templates()) + "\n")
    print(f"wrote {sum(sizes.values())} samples in {len(sizes)} shards, classes.txt and templates.txt to "
          f"{args.output_dir}")


if __name__ == "__main__":
    exit_with(main)
