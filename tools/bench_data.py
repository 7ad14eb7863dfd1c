#!/usr/bin/env python
"""Data-loader throughput: samples/s per worker for image shards and for latent shards."""
import json
import time

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, exit_with


def bench(data_path, tokenizer, image_size, batch, workers, batches):
    from megatron_ov3.data import DataConfig, DataIterator

    it = DataIterator(DataConfig(data_path=data_path, tokenizer=tokenizer, micro_batch_size=batch,
                                 image_size=image_size, num_workers=workers, shuffle_buffer=100))
    next(it)  # start-up (worker spawn) excluded
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    sps = batches * batch / dt
    return {"samples_per_s": sps, "samples_per_s_per_worker": sps / max(1, workers), "workers": workers}


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("--image-shards", required=True)
    p.add_argument("--latent-shards")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = {"image": bench(args.image_shards, args.tokenizer, args.image_size, args.micro_batch_size,
                          args.num_workers, args.batches)}
    if args.latent_shards:
        out["latent"] = bench(args.latent_shards, args.tokenizer, args.image_size, args.micro_batch_size,
                              args.num_workers, args.batches)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:6s} shards: {v['samples_per_s']:.1f} samples/s total, "
                  f"{v['samples_per_s_per_worker']:.1f} per worker ({v['workers']} workers)")


if __name__ == "__main__":
    exit_with(main)
