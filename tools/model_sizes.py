#!/usr/bin/env python
"""Print the named OV3 sizes with exact per-tower parameter counts (markdown)."""
import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--image-size", type=int, default=256)
    args = p.parse_args(argv)
    from megatron_ov3.models.sizes import size_table_markdown

    print(size_table_markdown(args.image_size))
    return 0


if __name__ == "__main__":
    exit_with(main)
