"""The ImageNet-1k kit: labelled shards from an ImageFolder tree and from a flat folder + labels file (KEY.cls),
the shipped 1000 class names and CLIP's 80 templates, zero-shot top-1/top-5 on a planted case against a
hand-computed answer, and tools/evaluate.py --classnames imagenet end to end."""
import io
import json
import os

import numpy as np
import pytest
import torch

from megatron_ov3.data.shards import expand_urls, iter_tar_samples
from megatron_ov3.eval.classes import (SIMPLE_TEMPLATES, classnames, clip_templates, imagenet_classes,
                                      imagenet_label, templates)

from dist_utils import run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WNIDS = {"n01440764": 0, "n01443537": 1, "n15075141": 999}  # tench, goldfish, toilet paper


def tool(name, *args):
    """The tool's main in-process (its command-line wiring: tests/e2e/test_entry_points.py)."""
    r = run_inprocess(os.path.join("tools", name), *args)
    return r.returncode, r.stdout, r.stderr


def _jpeg(seed, size=40):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _samples(folder):
    return [s for u in sorted(expand_urls(os.path.join(folder, "*.tar"))[0]) for s in iter_tar_samples(u, print)]


def test_shipped_class_names_and_templates():
    names, temps = classnames("imagenet"), clip_templates()
    assert len(names) == 1000 and len(temps) == 80 and all("{}" in t for t in temps)
    assert names[0] == "tench" and names[999] == "toilet paper" and imagenet_classes()[1] == ("n01443537", "goldfish")
    assert [w for w, _ in imagenet_classes()] == sorted(w for w, _ in imagenet_classes())  # ImageFolder's order
    assert imagenet_label("n15075141") == 999 and imagenet_label("cat") is None
    assert templates(None, "imagenet") == temps and templates(None, "pets.txt") == list(SIMPLE_TEMPLATES)
    assert templates("clip") == temps


@pytest.fixture(scope="module")
def imagefolder_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("imnet")
    for i, wnid in enumerate(WNIDS):
        (d / "val" / wnid).mkdir(parents=True)
        for j in range(2):
            (d / "val" / wnid / f"ILSVRC2012_val_{i * 2 + j:08d}.JPEG").write_bytes(_jpeg(i * 2 + j))
    rc, out, err = tool("make_shards.py", "--input-imagefolder", d / "val", "--output-dir", d / "shards",
                        "--samples-per-shard", 4, "--no-progress")
    assert rc == 0, err
    return d


def test_imagefolder_shards_carry_imagenet_labels(imagefolder_shards):
    samples = _samples(imagefolder_shards / "shards")
    assert len(samples) == 6
    got = sorted((int(s["cls"]), s["txt"].decode()) for s in samples)
    assert got == [(0, "a photo of a tench.")] * 2 + [(1, "a photo of a goldfish.")] * 2 + \
        [(999, "a photo of a toilet paper.")] * 2
    assert not (imagefolder_shards / "shards" / "classes.txt").exists()  # ImageNet: --classnames imagenet


def test_flat_folder_with_a_labels_file_and_other_imagefolders(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        (flat / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(_jpeg(i))
    # Kaggle-style CSV with a header and WordNet IDs, one integer label, one image left unlabelled
    (tmp_path / "labels.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_00000000,n01443537 1 2 3 4\n"
                                         "ILSVRC2012_val_00000001,n15075141 5 6 7 8\nILSVRC2012_val_00000002,7\n")
    rc, out, err = tool("make_shards.py", "--input-dir", flat, "--labels-file", tmp_path / "labels.csv",
                        "--output-dir", tmp_path / "s1", "--no-progress")
    assert rc == 0, err
    assert sorted(int(s["cls"]) for s in _samples(tmp_path / "s1")) == [1, 7, 999]
    assert json.load(open(tmp_path / "s1" / "stats.json"))["skipped"] == {"missing_label": 1}
    # a tree of other classes: labels by sorted folder name, names written to classes.txt
    for c in ("dog", "cat"):
        (tmp_path / "pets" / c).mkdir(parents=True)
        (tmp_path / "pets" / c / "a.png").write_bytes(_jpeg(3))
    rc, out, err = tool("make_shards.py", "--input-imagefolder", tmp_path / "pets", "--output-dir", tmp_path / "s2",
                        "--no-progress")
    assert rc == 0, err
    assert sorted((int(s["cls"]), s["txt"].decode()) for s in _samples(tmp_path / "s2")) == \
        [(0, "a photo of a cat."), (1, "a photo of a dog.")]
    assert (tmp_path / "s2" / "classes.txt").read_text() == "cat\ndog\n"
    (tmp_path / "bad.txt").write_text("ILSVRC2012_val_00000000 n99999999\nx y\n")
    rc, out, err = tool("make_shards.py", "--input-dir", flat, "--labels-file", tmp_path / "bad.txt",
                        "--output-dir", tmp_path / "s3", "--no-progress")
    assert rc == 2 and "neither an integer label nor an ImageNet-1k WordNet ID" in err


def _hand_topk(img, cls, labels, k):
    """Top-k accuracy by counting, per image, the classes scored strictly above the correct one (ties broken by
    the class index, as a stable sort would)."""
    hits = 0
    for e, y in zip(img, labels):
        s = [float(np.dot(e / np.linalg.norm(e), c / np.linalg.norm(c))) for c in cls]
        above = sum(1 for j, v in enumerate(s) if v > s[y] or (v == s[y] and j < y))
        hits += above < k
    return hits / len(labels)


def test_zero_shot_with_1000_names_and_80_templates_on_a_planted_case(tmp_path, mp1):
    from megatron_ov3.data.tokenizer import Tokenizer, train_tokenizer
    from megatron_ov3.eval.evaluate import class_embeddings
    from megatron_ov3.eval.metrics import zero_shot_topk
    from megatron_ov3.models import build_model, get_config
    from megatron_ov3.models.config import TowerConfig

    names, temps = classnames("imagenet"), clip_templates()
    tok = Tokenizer(train_tokenizer(names + temps, str(tmp_path / "tok"), vocab_size=400))
    cfg = get_config("tiny", image_size=32, vocab_size=tok.vocab_size, text=TowerConfig(32, 1, 64, 2),
                     text_context_length=32)  # a small text tower: 80,000 prompts in seconds on a CPU
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    cls = class_embeddings(model, tok, names, temps, "cpu")
    assert cls.shape == (1000, cfg.embed_dim) and torch.allclose(cls.norm(dim=-1), torch.ones(1000))
    # the class embedding averages the normalised embeddings of the 80 prompts
    with torch.no_grad():
        ids = torch.from_numpy(np.stack([tok.encode(t.format("goldfish"), 32) for t in temps]))
        one = torch.nn.functional.normalize(model.encode_text(ids).float(), dim=-1).mean(0)
    torch.testing.assert_close(cls[1], one / one.norm(), rtol=1e-5, atol=1e-5)
    labels = torch.tensor([0, 1, 999, 0, 1, 999])
    g = torch.Generator().manual_seed(0)
    planted = torch.stack([cls[0], cls[1], cls[999],            # exactly their class: top-1 right
                           cls[5], -cls[1],                     # another class; the opposite: wrong
                           cls[998] + 0.9 * cls[999] + 0.05 * torch.randn(cls.shape[1], generator=g)])
    got = zero_shot_topk(planted, cls, labels)
    want = {f"top{k}": _hand_topk(planted.numpy(), cls.numpy(), labels.tolist(), k) for k in (1, 5)}
    assert got == pytest.approx(want)
    assert 3 / 6 <= got["top1"] <= got["top5"] <= 5 / 6


def test_evaluate_cli_with_imagenet_classnames(imagefolder_shards, tmp_path):
    from megatron_ov3.data.tokenizer import train_tokenizer

    tok = train_tokenizer(classnames("imagenet") + clip_templates(), str(tmp_path / "tok"), vocab_size=400)
    rc, out, err = tool("init_checkpoint.py", "--image-size", 32, "--output", tmp_path / "init",
                        "--vocab-size", 400, "--tiny-vae")
    assert rc == 0, err
    (tmp_path / "two.txt").write_text("a photo of a {}.\na {}.\n")  # the tiny model's 80-token tower: 2,000 prompts
    rc, out, err = tool("evaluate.py", "--load", tmp_path / "init" / "universal", "--untrained",
                        "--data-path", imagefolder_shards / "shards" / "*.tar", "--tokenizer", tok,
                        "--classnames", "imagenet", "--templates", tmp_path / "two.txt", "--micro-batch-size", 6,
                        "--output", tmp_path / "ev")
    assert rc == 0, err[-3000:]
    rep = json.load(open(tmp_path / "ev" / "report.json"))
    assert rep["num_classes"] == 1000 and rep["num_images"] == 6
    assert 0 <= rep["zeroshot_top1"] <= rep["zeroshot_top5"] <= 1 and rep["chance_zeroshot_top1"] == 0.001
    (tmp_path / "three.txt").write_text("tench\ngoldfish\nfish\n")
    rc, out, err = tool("evaluate.py", "--load", tmp_path / "init" / "universal", "--untrained",
                        "--data-path", imagefolder_shards / "shards" / "*.tar", "--tokenizer", tok,
                        "--classnames", tmp_path / "three.txt", "--output", tmp_path / "ev2")
    assert rc == 2 and "carry class label 999, but --classnames names only 3 classes" in err
