#!/usr/bin/env python
"""Register the OV3 vision tower in LLaVA-1.5 (copy llava_ov3_tower.py, add the OV3 branch to builder.py).

  python tools/llava_patch.py --llava ~/LLaVA          # a checkout of haotian-liu/LLaVA
  python tools/llava_patch.py --llava installed        # the llava package of pip's llava-torch
"""
import importlib.util
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--llava", required=True, help="LLaVA checkout, its llava package folder, or 'installed'")
    args = p.parse_args(argv)
    from megatron_ov3.export.llava_patch import patch_llava

    path = args.llava
    if path == "installed":
        spec = importlib.util.find_spec("llava")
        if spec is None or not spec.submodule_search_locations:
            raise UsageError("no llava package is installed (pip install --no-deps llava-torch, or give a checkout)")
        path = list(spec.submodule_search_locations)[0]
    done = patch_llava(os.path.expanduser(path))
    print("\n".join(done) if done else f"{path}: already patched")


if __name__ == "__main__":
    exit_with(main)
