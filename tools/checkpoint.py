#!/usr/bin/env python
"""List, verify, or make the universal copy of megatron_ov3 checkpoints (no GPU, no DeepSpeed launch).

  list DIR                     every iter_* folder of a --save DIR: iteration, size, layout, manifest, universal copy
  verify DIR [--iteration N]   check files against their manifest (default: the one 'latest' names; --all: every
                               one); exit 0 when intact, 2 naming each damaged file
  to-universal DIR [--iteration N] [--output OUT]
                               write the layout-independent copy from DeepSpeed's files now (otherwise made on
                               demand when a run resumes at another layout or an export reads the checkpoint)
"""
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def _iter_dirs(directory: str, iteration, every: bool) -> list:
    from megatron_ov3.checkpointing import format as fmt

    if not os.path.isdir(directory):
        raise UsageError(f"{directory!r} is not a folder; pass a run's --save folder")
    if fmt.is_tag(os.path.basename(os.path.normpath(directory))):
        return [directory]
    tags = sorted(t for t in os.listdir(directory) if fmt.is_tag(t))
    if every:
        return [os.path.join(directory, t) for t in tags]
    if iteration is not None:
        tag = fmt.tag_for(iteration)
        if tag not in tags:
            raise UsageError(f"{directory} has no {tag}; it has {', '.join(tags) or 'no checkpoint'}")
        return [os.path.join(directory, tag)]
    latest = fmt.read_latest(directory)
    if latest is None:
        raise UsageError(f"{directory!r} has no 'latest' file; pass --iteration N or --all")
    return [os.path.join(directory, latest)]


def _describe(iter_dir: str) -> str:
    from megatron_ov3.checkpointing import format as fmt
    from megatron_ov3.checkpointing.restore import saved_layout

    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(iter_dir) for f in fs)
    meta = saved_layout(iter_dir) or {}
    layout = (f"TP{meta['tensor_parallel']} x PP{meta['pipeline_stages']} x DP{meta['data_parallel']} "
              f"ZeRO-{meta.get('zero_stage', '?')}" if "tensor_parallel" in meta else "layout unknown")
    manifest = fmt.read_manifest(iter_dir)
    uni = "universal copy" if os.path.isfile(os.path.join(iter_dir, "universal", "meta.json")) else "no universal copy"
    files = f"{len(manifest)} files in manifest" if manifest is not None else "no manifest"
    return f"{os.path.basename(iter_dir)}  {size / 2**20:9.1f} MiB  {layout}; {files}; {uni}"


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["list", "verify", "to-universal"])
    p.add_argument("directory", help="a run's --save folder, or one of its iter_* folders")
    p.add_argument("--iteration", type=int, default=None, help="which iter_* (default: the one 'latest' names)")
    p.add_argument("--all", action="store_true", help="verify: every iter_* folder")
    p.add_argument("--output", default=None, help="to-universal: where to write (default: ITER_DIR/universal)")
    args = p.parse_args(argv)
    from megatron_ov3.checkpointing import format as fmt
    from megatron_ov3.checkpointing.from_deepspeed import to_universal

    if args.command == "list":
        for d in _iter_dirs(args.directory, None, every=True):
            print(_describe(d))
        return 0
    if args.command == "to-universal":
        (d,) = _iter_dirs(args.directory, args.iteration, every=False)
        to_universal(d, output=args.output)
        return 0
    bad, unverifiable = 0, []
    for d in _iter_dirs(args.directory, args.iteration, every=args.all):
        if fmt.read_manifest(d) is None:
            print(f"{d}: NOT VERIFIABLE: no manifest.json (written before manifests existed, or not by megatron_ov3)")
            unverifiable.append(os.path.basename(d))
            continue
        problems = fmt.verify(d)
        bad += len(problems)
        print(f"{d}: {'intact' if not problems else 'DAMAGED'} ({len(fmt.read_manifest(d))} files)")
        for line in problems:
            print(f"  {line}")
    if bad:
        raise UsageError(f"{bad} damaged file(s) (listed above); resume from an intact iter_* folder (edit 'latest')")
    if unverifiable:
        raise UsageError(f"{', '.join(unverifiable)} cannot be verified (no manifest): its files are unchecked, not "
                         f"known intact; loading it checks that they load")
    return 0


if __name__ == "__main__":
    exit_with(main)
