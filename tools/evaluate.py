#!/usr/bin/env python
"""Evaluate a megatron_ov3 checkpoint on held-out image shards: reconstruction (PSNR, SSIM, LPIPS, rFID),
retrieval recall@1/5/10, zero-shot classification (with --classnames), picture grid. Data-parallel: launch with
torchrun/deepspeed for several processes (each takes its share of the shards)."""
import json
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, UsageError, exit_with


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--load", required=True, help="checkpoint folder (any layout; its universal copy is used)")
    p.add_argument("--untrained", action="store_true", help="evaluate the architecture at initialisation instead")
    p.add_argument("--data-path", required=True, help="held-out image shards")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--vae-path", default=None, help="default: the VAE training used (--tiny-vae runs: the toy VAE)")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--classnames", default=None, help="'imagenet' (the shipped ImageNet-1k names) or a file, one class "
                   "name per line (label i = line i), for the shards' KEY.cls labels")
    p.add_argument("--templates", default=None, help="'clip' (CLIP's 80 ImageNet templates) or a file of prompt "
                   "templates with '{}' (default: clip with --classnames imagenet, else 3 simple ones)")
    p.add_argument("--lpips-path", default=None, help="local LPIPS-VGG weights")
    p.add_argument("--inception-weights", default=None, help="local FID Inception-v3 weights for rFID "
                   "(pt_inception-2015-12-05-6726825d.pth, as pytorch-fid / torch-fidelity use)")
    p.add_argument("--output", required=True, help="folder for report.json and grid.png: new or empty, or an earlier "
                   "evaluate output (its report.json and grid.png are replaced)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    args = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    from megatron_ov3 import parallel
    from megatron_ov3.data import DataConfig, DataIterator, Tokenizer
    from megatron_ov3.eval import classes
    from megatron_ov3.eval.evaluate import evaluate, format_table, save_grid
    from megatron_ov3.eval.summary import paper_table
    from megatron_ov3.eval.metrics import inception_feature_extractor
    from megatron_ov3.checkpointing import load_model
    from megatron_ov3.models.lpips import LPIPS

    from megatron_ov3.outputs import check_claim, claim

    classnames = classes.classnames(args.classnames) if args.classnames else None
    templates = classes.templates(args.templates, args.classnames)
    check_claim(args.output, "evaluate", "--output")
    lpips = LPIPS.from_file(args.lpips_path) if args.lpips_path else None  # a bad file is refused before the work
    parallel.initialize_model_parallel(1, 1, seed=args.seed)  # every rank holds the whole model
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(args.load, vae_path=args.vae_path, weights=not args.untrained)
    model.to(device).to_frozen(device)
    tok = Tokenizer(args.tokenizer)
    if tok.vocab_size != model.cfg.vocab_size:
        raise UsageError(f"--tokenizer {args.tokenizer!r} has {tok.vocab_size} tokens, but the checkpoint's model was "
                         f"trained with a {model.cfg.vocab_size}-token vocabulary; pass the tokenizer training used "
                         f"(job_config.json in the checkpoint names it)")
    claim(args.output, "evaluate", "--output")  # after every check of the inputs: a refused run writes nothing
    data = DataIterator(DataConfig(tokenizer=args.tokenizer, micro_batch_size=args.micro_batch_size,
                                   image_size=model.cfg.image_size, num_workers=args.num_workers, seed=args.seed,
                                   text_length=model.cfg.text_context_length, caption_length=model.cfg.caption_length)
                        .for_evaluation(args.data_path),
                        dist.get_rank(), dist.get_world_size())
    res = evaluate(model, data, device, tok, classnames, templates,
                   lpips=lpips.to(device) if lpips is not None else None,
                   inception=(inception_feature_extractor(args.inception_weights, device)
                              if args.inception_weights else None),
                   max_batches=args.max_batches, group=dist.group.WORLD)
    if dist.get_rank() == 0:
        os.makedirs(args.output, exist_ok=True)
        report = dict(res["report"], checkpoint=os.path.abspath(args.load), untrained=args.untrained)
        with open(os.path.join(args.output, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if res["grid"] is not None:
            save_grid(res["grid"], os.path.join(args.output, "grid.png"))
        name = "OV3 untrained" if args.untrained else f"OV3 ({os.path.basename(os.path.abspath(args.load))})"
        with open(os.path.join(args.output, "report.md"), "w") as f:
            f.write(paper_table([(name, report)]) + "\n")
        print(format_table(res["report"]))
        print(f"wrote {os.path.join(args.output, 'report.json')}, report.md (the paper's table; several reports: "
              f"tools/paper_table.py) and grid.png (rows: input | VAE alone | OV3)")


if __name__ == "__main__":
    exit_with(main)
