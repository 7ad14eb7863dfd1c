"""Each data tool's CLI end to end on small data, and its bad inputs: one-line error, exit code 2."""
import csv
import json
import os

import pytest

from dist_utils import run_inprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool(name, *args):
    """The tool's main in-process (its command-line wiring: tests/e2e/test_entry_points.py)."""
    r = run_inprocess(os.path.join("tools", name), *args)
    return r.returncode, r.stdout, r.stderr


def assert_usage_error(rc, err, fragment):
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from megatron_ov3.data.synthetic import synthetic_sample
    import random

    d = tmp_path_factory.mktemp("imgs")
    rng = random.Random(0)
    rows = []
    for i in range(10):
        jpg, cap, _ = synthetic_sample(rng, 40)
        (d / f"img{i}.jpg").write_bytes(jpg)
        if i != 9:
            (d / f"img{i}.txt").write_text(cap)
        rows.append({"path": f"img{i}.jpg", "caption": cap})
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (d / "broken.txt").write_text("a broken image")
    with open(d / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "caption"])
        w.writeheader()
        w.writerows(rows)
    return d


def test_make_shards_from_folder(images, tmp_path):
    rc, out, err = tool("make_shards.py", "--input-dir", images, "--output-dir", tmp_path / "o",
                        "--samples-per-shard", 4, "--no-progress")
    assert rc == 0, err
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    assert stats["written"] == 9 and stats["skipped"] == {"bad_image": 1, "missing_caption": 1}
    sizes = json.loads((tmp_path / "o" / "sizes.json").read_text())
    assert sizes == {"shard-00000.tar": 4, "shard-00001.tar": 4, "shard-00002.tar": 1}
    # re-shard the result
    rc, out, err = tool("make_shards.py", "--input-shards", str(tmp_path / "o" / "shard-{00000..00002}.tar"),
                        "--output-dir", tmp_path / "r", "--samples-per-shard", 3, "--no-progress")
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "stats.json").read_text())["written"] == 9
    # a truncated input shard: its readable samples are kept and the damage is counted, not silently dropped
    raw = (tmp_path / "o" / "shard-00001.tar").read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "shard-00000.tar").write_bytes((tmp_path / "o" / "shard-00000.tar").read_bytes())
    (cut / "shard-00001.tar").write_bytes(raw[: len(raw) // 2])
    rc, out, err = tool("make_shards.py", "--input-shards", str(cut / "shard-{00000..00001}.tar"),
                        "--output-dir", tmp_path / "c", "--samples-per-shard", 3, "--no-progress")
    assert rc == 0, err
    stats = json.loads((tmp_path / "c" / "stats.json").read_text())
    assert 4 <= stats["written"] < 8 and stats["skipped"].get("bad_shard") == 1, stats
    assert stats["bad_input_shards"] == [str(cut / "shard-00001.tar")] and "bad_shard" in out


def test_make_shards_from_table(images, tmp_path):
    rc, out, err = tool("make_shards.py", "--input-table", images / "table.csv", "--output-dir", tmp_path / "t",
                        "--no-progress")
    assert rc == 0, err
    assert json.loads((tmp_path / "t" / "stats.json").read_text())["written"] == 10


def test_make_shards_bad_inputs(images, tmp_path):
    rc, _, err = tool("make_shards.py", "--input-dir", tmp_path / "nope", "--output-dir", tmp_path / "x")
    assert_usage_error(rc, err, "does not exist")
    rc, _, err = tool("make_shards.py", "--input-table", images / "table.csv", "--caption-column", "text",
                      "--output-dir", tmp_path / "y")
    assert_usage_error(rc, err, "no column(s) ['text']")
    rc, _, err = tool("make_shards.py", "--input-dir", images, "--output-dir", tmp_path / "z",
                      "--samples-per-shard", 0)
    assert_usage_error(rc, err, "--samples-per-shard must be >= 1")
    rc, _, err = tool("make_shards.py", "--output-dir", tmp_path / "z")
    assert rc == 2 and "one of the arguments" in err


def test_synthetic_tokenizer_cache_bench(tmp_path):
    rc, out, err = tool("make_synthetic_data.py", "--output-dir", tmp_path / "s", "--num-samples", 40,
                        "--samples-per-shard", 10, "--image-size", 32)
    assert rc == 0, err
    spec = str(tmp_path / "s" / "synthetic-{00000..00003}.tar")
    rc, out, err = tool("train_tokenizer.py", "--data-path", spec, "--output-prefix", tmp_path / "tok",
                        "--vocab-size", 64)
    assert rc == 0 and (tmp_path / "tok.model").exists(), err
    rc, out, err = tool("cache_latents.py", "--data-path", spec, "--output-dir", tmp_path / "lat",
                        "--image-size", 32, "--tiny-vae", "--rank", 1, "--world-size", 2)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "lat")) == [".megatron_ov3.json", "latent_cache.json", "synthetic-00001.tar",
                                                 "synthetic-00003.tar"]
    # one folder, one latent normalisation; training refuses latents of another one
    rc, out, err = tool("cache_latents.py", "--data-path", spec, "--output-dir", tmp_path / "lat",
                        "--image-size", 32, "--tiny-vae", "--vae-shift-factor", 0)
    assert_usage_error(rc, err, "already holds latents made with")
    from megatron_ov3.data.latent_cache import check_latent_normalisation
    from megatron_ov3.models import FrozenVAE

    lat = str(tmp_path / "lat" / "synthetic-{00001,00003}.tar")
    check_latent_normalisation(lat, FrozenVAE.tiny(), 32)
    with pytest.raises(ValueError, match="set --vae-shift-factor 0.1159"):
        check_latent_normalisation(lat, FrozenVAE.tiny(shift_factor=0.0), 32)
    rc, out, err = tool("bench_data.py", "--image-shards", spec, "--tokenizer", tmp_path / "tok.model",
                        "--image-size", 32, "--micro-batch-size", 4, "--batches", 3, "--num-workers", 1, "--rounds",
                        1, "--model-size", "B", "--http", "--json")
    assert rc == 0, err
    remote = json.loads(out.strip().splitlines()[-1])["http"]
    assert remote["http"]["images_per_s"] > 0 and remote["ratio"] == pytest.approx(
        remote["http"]["images_per_s"] / remote["local"]["images_per_s"])
    res = json.loads(out.strip().splitlines()[-1])["image"]
    ours, peer = res["ours"]["images_per_s_per_worker"], res["open_clip"]["images_per_s_per_worker"]
    assert ours > 0 and peer > 0 and res["ratio"] == pytest.approx(ours / peer)
    need = json.loads(out.strip().splitlines()[-1])["workers_per_gpu"]["B"]
    assert need["workers"] == -(-need["planner_images_per_s_per_gpu"] // ours)


def test_bench_latent_crop_reports_both_targets(tmp_path):
    from megatron_ov3.data.synthetic import write_synthetic_shards

    write_synthetic_shards(str(tmp_path), 6, samples_per_shard=6, image_size=64, seed=0)
    rc, out, err = tool("bench_latent_crop.py", "--data-path", tmp_path / "synthetic-00000.tar", "--tiny-vae",
                        "--image-size", 32, "--num-images", 4, "--json")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["images"] == 4 and res["cache_size"] == 64 and res["latent_rel_l1"] > 0
    assert all(0 < res[k] < 100 for k in ("psnr_true_latent", "psnr_latent_crop"))


def test_tool_bad_inputs(tmp_path):
    rc, _, err = tool("train_tokenizer.py", "--text-file", tmp_path / "none.txt", "--output-prefix", tmp_path / "t")
    assert_usage_error(rc, err, "does not exist")
    rc, _, err = tool("cache_latents.py", "--data-path", tmp_path / "x.tar", "--output-dir", tmp_path / "o",
                      "--image-size", 32, "--tiny-vae")
    assert_usage_error(rc, err, "does not exist")
    rc, _, err = tool("cache_latents.py", "--data-path", tmp_path / "x.tar", "--output-dir", tmp_path / "o",
                      "--image-size", 30, "--tiny-vae")
    assert_usage_error(rc, err, "positive multiple of 16")
    rc, _, err = tool("cache_latents.py", "--data-path", tmp_path / "x.tar", "--output-dir", tmp_path / "o",
                      "--image-size", 32, "--tiny-vae", "--batch-size", 0)
    assert_usage_error(rc, err, "--batch-size must be >= 1")
