"""tools/evaluate.py end to end: a briefly trained tiny OV3 beats the untrained one on held-out synthetic data
(retrieval and reconstruction); in-training evaluation writes reports and picture grids; 2-process evaluation
covers the held-out set."""
import json
import os
import subprocess
import sys

import pytest

from dist_utils import free_port, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # trains 150 iterations and evaluates through the launcher
DS = os.path.join(os.path.dirname(sys.executable), "deepspeed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """About 95 s: 150 iterations on 1,600 synthetic samples, the least training after which a trained model
    beats the untrained one on held-out data by margins a test can assert (shorter runs in other tests only
    prove that training runs); also the in-training evaluation's reports and grids."""
    from megatron_ov3.data.synthetic import class_names, write_synthetic_shards
    from megatron_ov3.data.tokenizer import train_tokenizer
    from megatron_ov3.data.shards import iter_tar_samples

    d = tmp_path_factory.mktemp("evalrun")
    write_synthetic_shards(str(d / "train"), 1600, samples_per_shard=200, image_size=32, seed=0)
    write_synthetic_shards(str(d / "heldout"), 128, samples_per_shard=32, image_size=32, seed=99)
    caps = [s["txt"].decode() for i in range(8)
            for s in iter_tar_samples(str(d / "train" / f"synthetic-{i:05d}.tar"), print)]
    tok = train_tokenizer(caps, str(d / "tok"), vocab_size=64)
    (d / "classes.txt").write_text("\n".join(class_names()) + "\n")
    env = subprocess_env(ROOT)
    cmd = [sys.executable, "-m", "megatron_ov3.pretrain",
           "--data-path", str(d / "train" / "synthetic-{00000..00007}.tar"),
           "--tokenizer", tok, "--tiny-vae", "--image-size", "32", "--micro-batch-size", "16", "--global-batch-size",
           "16", "--train-iters", "150", "--lr", "3e-3", "--lr-warmup-iters", "10", "--weight-decay", "0.05",
           "--num-workers", "1", "--log-interval", "50", "--save", str(d / "ck"),
           "--eval-data-path", str(d / "heldout" / "synthetic-{00000..00003}.tar"), "--eval-interval", "150",
           "--eval-batches", "2", "--eval-classnames", str(d / "classes.txt"), "--tensorboard-dir", str(d / "tb")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "evaluation at iteration 150" in r.stdout
    return d, tok


def _evaluate(d, tok, out, *extra, nproc=1):
    args = ["--load", str(d / "ck"), "--data-path", str(d / "heldout" / "synthetic-{00000..00003}.tar"),
            "--tokenizer", tok, "--micro-batch-size", "16", "--classnames", str(d / "classes.txt"),
            "--output", str(out), *extra]
    env = subprocess_env(ROOT)
    tool = os.path.join(ROOT, "tools", "evaluate.py")
    cmd = [sys.executable, tool, *args] if nproc == 1 else \
        [DS, "--num_gpus", str(nproc), "--master_port", str(free_port()), tool, *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(out / "report.json"))


@pytest.fixture(scope="module")
def trained_report(trained, tmp_path_factory):
    d, tok = trained
    out = tmp_path_factory.mktemp("trained_eval")
    return _evaluate(d, tok, out), out


def test_trained_beats_untrained(trained, trained_report, tmp_path):
    d, tok = trained
    t, t_out = trained_report
    u = _evaluate(d, tok, tmp_path / "untrained", "--untrained")
    assert t["num_images"] == u["num_images"] == 128
    assert t["psnr"] > u["psnr"] and t["ssim"] > u["ssim"]
    recall = lambda r: sum(v for k, v in r.items() if k.startswith("retrieval_"))  # noqa: E731
    assert recall(t) > recall(u), (t, u)
    assert 0.0 <= t["zeroshot_top1"] <= 1.0
    assert (t_out / "grid.png").exists()
    assert list((d / "ck" / "eval").glob("grid_*.png")) and list((d / "ck" / "eval").glob("report_*.json"))


def test_two_process_evaluation_covers_the_set(trained, trained_report, tmp_path):
    d, tok = trained
    one = trained_report[0]
    two = _evaluate(d, tok, tmp_path / "two", nproc=2)
    assert two["num_images"] == 128
    assert abs(two["psnr"] - one["psnr"]) < 1e-3


def test_evaluate_bad_inputs(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", str(tmp_path / "x"),
                        "--data-path", "a.tar", "--tokenizer", "t.model", "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_reconstruction_table_with_rfid_for_vae_and_ov3(trained, trained_report, tmp_path):
    """rFID (the plain-torch FID Inception with stand-in weights: no download here), VAE and OV3 rows, the paper's
    table from one report (report.md) and from several (tools/paper_table.py)."""
    import ast

    import numpy as np
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests", "data"))
    from inception_weights import synthetic_weights

    ref = np.load(os.path.join(ROOT, "tests", "data", "inception_reference.npz"))
    shapes = {str(n): ast.literal_eval(str(s)) for n, s in zip(ref["names"], ref["shapes"])}
    torch.save({k: torch.from_numpy(v) for k, v in synthetic_weights(shapes).items()}, tmp_path / "inception.pth")
    d, tok = trained
    rep = _evaluate(d, tok, tmp_path / "fid", "--inception-weights", str(tmp_path / "inception.pth"),
                    "--max-batches", "1")
    assert rep["num_images"] == 16 and rep["rfid"] > 0 and rep["vae_rfid"] >= 0
    table = (tmp_path / "fid" / "report.md").read_text().splitlines()
    assert table[0].startswith("| model | rFID | PSNR | SSIM | LPIPS | zero-shot top-1 | I->T R@1")
    assert table[2].startswith(f"| VAE (frozen, alone) | {rep['vae_rfid']:.3f} | {rep['vae_psnr']:.3f} |")
    assert table[3].startswith(f"| OV3 (ck) | {rep['rfid']:.3f} | {rep['psnr']:.3f} | {rep['ssim']:.3f} | — |")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "paper_table.py"), str(tmp_path / "fid"),
                        str(trained_report[1] / "report.json"), "--names", "short", "full"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    rows = r.stdout.strip().splitlines()
    assert len(rows) == 5 and rows[3].startswith("| short |") and rows[4].startswith("| full | — |")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "paper_table.py"), str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and "not found" in r.stderr
