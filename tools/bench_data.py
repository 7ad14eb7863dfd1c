#!/usr/bin/env python
"""Data-loader throughput, images/s per loader worker: our pipeline against open_clip's, in one run.

The peer is open_clip's training pipeline (open_clip_train/data.py: shard list -> split by worker -> tar samples ->
shuffle -> decode 'pilrgb' -> rename -> map(preprocess, tokenize) -> tuple -> batched) built from webdataset's own
primitives, because open_clip imports torchvision, which does not import beside the CPU torch build this project
pins. Its preprocess makes the PIL calls torchvision's would: RandomResizedCrop(scale=(0.4, 1), bilinear) as
``img.crop(box).resize(...)`` on the fully decoded image, ColorJitter(0.32, 0.32, 0.32, 0.08) p 0.8 and
RandomGrayscale(0.2) through ImageEnhance and an 8-bit HSV hue shift, ToTensor + Normalize; it tokenizes one
caption with the same sentencepiece model. Ours does the same stages plus a second caption, per-sample seeding, bad-data
accounting and the resume position.

``--make-shards DIR`` first writes realistic JPEG shards (512px sources with 1/f "natural image" spectra, quality
90, the size of web photos) when DIR holds none. ``--model-size`` adds, from the planner's predicted img/s per GPU
(1 node of 8 H100, --image-size, --global-batch-size), how many loader workers per GPU that model needs at the
measured rate.
"""
import contextlib
import io
import json
import math
import os
import random
import time

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, exit_with
from megatron_ov3.errors import UsageError


def natural_jpeg(rng, width=512, height=384, quality=90) -> bytes:
    """A JPEG with a natural image's 1/f amplitude spectrum (so it compresses and decodes like a photo)."""
    import numpy as np
    from PIL import Image

    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    chans = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        chans.append(np.fft.irfft2(amp * np.exp(1j * phase), s=(height, width)))
    x = np.stack(chans, -1)
    x = (x - x.mean()) / (x.std() + 1e-8) * 50 + rng.uniform(90, 160, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_shards(out_dir, num, per_shard, seed=0) -> str:
    """Write ``num`` realistic samples into ``out_dir`` unless it holds shards already; their brace-free glob."""
    import numpy as np

    from megatron_ov3.data.shards import ShardWriter

    if not (os.path.isdir(out_dir) and any(f.endswith(".tar") for f in os.listdir(out_dir))):
        rng = np.random.default_rng(seed)
        words = ["photo", "red", "car", "street", "dog", "park", "sunset", "house", "people", "food"]
        with ShardWriter(out_dir, per_shard, prefix="bench") as w:
            for i in range(num):
                cap = " ".join(rng.choice(words, 8)) + f". a picture number {i}."
                w.write(f"{i:08d}", {"jpg": natural_jpeg(rng, *((512, 384) if i % 2 else (384, 512))),
                                     "txt": cap.encode()})
    return os.path.join(out_dir, "bench-*.tar")


def ours(spec, tokenizer, size, batch, workers):
    from megatron_ov3.data import DataConfig, DataIterator

    return DataIterator(DataConfig(data_path=spec, tokenizer=tokenizer, micro_batch_size=batch, image_size=size,
                                   num_workers=workers, shuffle_buffer=1000))


def open_clip_style(spec, tokenizer, size, batch, workers):
    """open_clip_train's webdataset pipeline (see the module docstring) over the same shards."""
    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image
    from torch.utils.data import DataLoader

    from megatron_ov3.data.images import Augment, apply_jitter_pil, inception_box, jitter_ops
    from megatron_ov3.data.shards import expand_urls
    from megatron_ov3.data.tokenizer import Tokenizer

    tok, aug = Tokenizer(tokenizer), Augment()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)  # open_clip's OPENAI_DATASET_MEAN/STD
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)

    def preprocess(img):
        left, top, w, h = inception_box(img.width, img.height, aug.min_area, random)
        img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
        ops = jitter_ops(aug, random)  # ColorJitter (p 0.8), then RandomGrayscale (0.2), on PIL
        img = apply_jitter_pil(img, ops) if ops else img
        if random.random() < aug.grayscale_prob:
            img = img.convert("L").convert("RGB")
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - mean) / std

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_urls(spec)[0]), wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue), wds.shuffle(1000),
        wds.decode("pilrgb", handler=wds.warn_and_continue), wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda t: torch.from_numpy(tok.encode(t, 80))),
        wds.to_tuple("image", "text"), wds.batched(batch, partial=False))
    return iter(DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False,
                           prefetch_factor=2 if workers else None))


def timed(make, batches, batch, workers) -> dict:
    it = make()
    next(it)  # start-up (worker spawn, first shard open) excluded
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    sps = batches * batch / (time.perf_counter() - t)
    return {"images_per_s": sps, "images_per_s_per_worker": sps / max(1, workers), "workers": workers}


def compare(spec, tokenizer, size, batch, workers, batches, rounds) -> dict:
    """Both pipelines, alternated ``rounds`` times; the best round of each (the least disturbed by the machine)."""
    runs = {"ours": [], "open_clip": []}
    for _ in range(rounds):
        runs["ours"].append(timed(lambda: ours(spec, tokenizer, size, batch, workers), batches, batch, workers))
        runs["open_clip"].append(timed(lambda: open_clip_style(spec, tokenizer, size, batch, workers), batches,
                                       batch, workers))
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    best["ratio"] = best["ours"]["images_per_s"] / best["open_clip"]["images_per_s"]
    return best


@contextlib.contextmanager
def http_served(folder):
    """``folder`` served over HTTP on 127.0.0.1 (an ephemeral port) while the block runs: the base URL."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=folder))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def remote_vs_local(spec, tokenizer, size, batch, workers, batches, rounds) -> dict:
    """Our pipeline over the shards as local paths and as ``http://`` URLs of a local server (an ``@FILE`` list),
    alternated ``rounds`` times, best round of each: what reading through a URL costs beyond the network."""
    import tempfile

    from megatron_ov3.data.shards import expand_urls

    shards = expand_urls(spec)[0]
    folder = os.path.dirname(os.path.abspath(shards[0]))
    runs = {"local": [], "http": []}
    with http_served(folder) as base, tempfile.NamedTemporaryFile("w", suffix=".txt") as listed:
        listed.write("\n".join(f"{base}/{os.path.basename(u)}" for u in shards))
        listed.flush()
        for _ in range(rounds):
            for name, form in (("local", spec), ("http", "@" + listed.name)):
                runs[name].append(timed(lambda: ours(form, tokenizer, size, batch, workers), batches, batch, workers))
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in runs.items()}
    best["ratio"] = best["http"]["images_per_s"] / best["local"]["images_per_s"]
    return best


def workers_per_gpu(sizes, per_worker, image_size, global_batch) -> dict:
    """Loader workers each GPU needs to feed the planner's predicted img/s per GPU (one node of 8 H100)."""
    from megatron_ov3.scaling.planner import Hardware, plan

    out = {}
    for size in sizes:
        best = plan(size, [1], Hardware(), image_size=image_size, global_batch=global_batch, top=1)[0]["best"][0]
        per_gpu = best["samples_per_s"] / Hardware().gpus_per_node
        out[size] = {"planner_images_per_s_per_gpu": per_gpu, "workers": math.ceil(per_gpu / per_worker)}
    return out


def main(argv=None):
    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image-shards", help="image shards to read (brace notation)")
    src.add_argument("--make-shards", metavar="DIR", help="write (once) and read realistic 512px JPEG shards")
    p.add_argument("--num-samples", type=int, default=800, help="with --make-shards")
    p.add_argument("--latent-shards", help="also time latent shards (our pipeline only)")
    p.add_argument("--tokenizer", help="sentencepiece model (default with --make-shards: trained on its captions)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two pipelines (best round kept)")
    p.add_argument("--model-size", nargs="*", default=[], help="report loader workers per GPU for these sizes")
    p.add_argument("--global-batch-size", type=int, default=4096, help="of the planned run (--model-size)")
    p.add_argument("--http", action="store_true", help="also time our pipeline over http:// URLs of the same shards "
                                                       "(a local server on 127.0.0.1) against the local paths")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if min(args.batches, args.rounds, args.micro_batch_size, args.num_samples) < 1 or args.num_workers < 0:
        raise UsageError("--batches, --rounds, --micro-batch-size and --num-samples must be >= 1, --num-workers >= 0")
    spec, tokenizer = args.image_shards, args.tokenizer
    if args.make_shards:
        spec = make_shards(args.make_shards, args.num_samples, max(1, args.num_samples // 8))
        if tokenizer is None:
            from megatron_ov3.data.shards import caption_of, expand_urls, iter_tar_samples
            from megatron_ov3.data.tokenizer import train_tokenizer

            caps = [caption_of(s) for u in expand_urls(spec)[0] for s in iter_tar_samples(u, print)]
            tokenizer = train_tokenizer(caps, os.path.join(args.make_shards, "tok"), vocab_size=64)
    if tokenizer is None:
        raise UsageError("give --tokenizer (or --make-shards, which trains one)")
    out = {"image": compare(spec, tokenizer, args.image_size, args.micro_batch_size, args.num_workers, args.batches,
                            args.rounds)}
    if args.latent_shards:
        out["latent"] = timed(lambda: ours(args.latent_shards, tokenizer, args.image_size, args.micro_batch_size,
                                           args.num_workers), args.batches, args.micro_batch_size, args.num_workers)
    if args.http:
        out["http"] = remote_vs_local(spec, tokenizer, args.image_size, args.micro_batch_size, args.num_workers,
                                      args.batches, args.rounds)
    if args.model_size:
        out["workers_per_gpu"] = workers_per_gpu(args.model_size, out["image"]["ours"]["images_per_s_per_worker"],
                                                 args.image_size, args.global_batch_size)
    print(json.dumps(out) if args.json else report(out, args))


def report(out, args) -> str:
    img = out["image"]
    lines = [f"{args.image_size}px, augmentation on, micro-batch {args.micro_batch_size}, {args.num_workers} "
             f"worker(s): ours {img['ours']['images_per_s_per_worker']:.1f} img/s per worker, open_clip's pipeline "
             f"{img['open_clip']['images_per_s_per_worker']:.1f} ({img['ratio']:.2f}x)"]
    if "http" in out:
        h = out["http"]
        lines.append(f"ours over http:// (local server): {h['http']['images_per_s_per_worker']:.1f} img/s per worker "
                     f"against {h['local']['images_per_s_per_worker']:.1f} from local paths ({h['ratio']:.2f}x)")
    if "latent" in out:
        lines.append(f"latent shards: {out['latent']['images_per_s_per_worker']:.1f} img/s per worker")
    for size, w in out.get("workers_per_gpu", {}).items():
        lines.append(f"OV3-{size}: planner {w['planner_images_per_s_per_gpu']:.0f} img/s per GPU -> "
                     f"{w['workers']} loader workers per GPU at this rate")
    return "\n".join(lines)


if __name__ == "__main__":
    exit_with(main)
