#!/usr/bin/env python
"""Write image-text tar shards (img2dataset layout) from a folder of images with same-named .txt captions,
from a CSV/TSV/parquet of (local image path, caption), by re-sharding existing tars, or from labelled images
(an ImageFolder tree, or a flat folder plus a labels file: ImageNet's validation set) with KEY.cls labels.
Images are validated; bad samples are skipped and counted; a sizes.json and stats.json are written next to the
shards."""
import json
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-dir", help="folder of images with same-named .txt captions (recursive)")
    src.add_argument("--input-table", help="CSV/TSV/parquet with an image-path column and a caption column")
    src.add_argument("--input-shards", help="existing shards to re-shard (brace notation, '::' joins)")
    src.add_argument("--input-imagefolder", help="labelled tree DIR/<class>/<image> (e.g. ImageNet val/<wnid>/*.JPEG): "
                     "writes KEY.cls; ImageNet WordNet-ID folders get ImageNet-1k labels and names")
    p.add_argument("--labels-file", help="with --input-dir: 'NAME LABEL' lines (integer label or WordNet ID, e.g. "
                   "ImageNet's flat val folder) -> KEY.cls; images need no .txt")
    p.add_argument("--classnames", default="imagenet", help="class names by label for --labels-file captions: "
                   "'imagenet' (shipped) or a file (default %(default)s)")
    p.add_argument("--caption-template", default="a photo of a {}.", help="caption of a labelled image")
    p.add_argument("--path-column", default="path")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--output-dir", required=True, help="new or empty folder (one make_shards claimed that holds no "
                   "shards yet is reused)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-00000.tar")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from megatron_ov3.data import make_shards as ms

    if args.samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    from megatron_ov3.outputs import claim

    claim(args.output_dir, "make_shards", "--output-dir")
    if any(f.endswith(".tar") for f in os.listdir(args.output_dir)):
        raise UsageError(f"--output-dir {args.output_dir!r} already holds shards; choose an empty folder")
    if "{}" not in args.caption_template:
        raise UsageError("--caption-template needs a '{}' for the class name")
    if args.labels_file and not args.input_dir:
        raise UsageError("--labels-file labels the images of --input-dir")
    if args.input_imagefolder:
        samples = ms.from_imagefolder(args.input_imagefolder, args.caption_template)
    elif args.labels_file:
        from megatron_ov3.eval.classes import classnames

        samples = ms.from_labels_file(args.input_dir, args.labels_file, classnames(args.classnames),
                                      args.caption_template)
    elif args.input_dir:
        samples = ms.from_folder(args.input_dir)
    elif args.input_table:
        samples = ms.from_table(args.input_table, args.path_column, args.caption_column)
    else:
        samples = ms.from_tars(args.input_shards)
    stats = ms.write_shards(samples, args.output_dir, args.samples_per_shard, args.prefix, not args.no_progress)
    with open(os.path.join(args.output_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    if args.input_imagefolder:  # the class list of these labels, for evaluate.py --classnames
        _write_classes(args.input_imagefolder, os.path.join(args.output_dir, "classes.txt"))
    if stats["written"] == 0:
        raise UsageError(f"no valid sample found (skipped: {stats['skipped']}); check the input")
    print(f"wrote {stats['written']} samples in {stats['shards']} shards to {args.output_dir}; "
          f"skipped {sum(stats['skipped'].values())} {stats['skipped'] or ''}")


def _write_classes(folder, path):
    from megatron_ov3.data.make_shards import imagefolder_classes

    classes, imagenet = imagefolder_classes(folder)
    if imagenet:
        return  # ImageNet labels: --classnames imagenet
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(c + "\n" for c in classes))


if __name__ == "__main__":
    exit_with(main)
