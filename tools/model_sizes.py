#!/usr/bin/env python
"""Print the named OV3 sizes with exact per-tower parameter counts (markdown)."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ov3.models.sizes import size_table_markdown  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image-size", type=int, default=256)
    args = p.parse_args(argv)
    print(size_table_markdown(args.image_size))


if __name__ == "__main__":
    main()
