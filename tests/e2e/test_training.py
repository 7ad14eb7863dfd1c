"""The training job through the real DeepSpeed launcher on CPU (gloo): run, exact resume, crash safety,
SIGTERM, usage errors."""
import os
import signal
import subprocess
import sys
import time

import pytest

from dist_utils import free_port, run_inprocess, subprocess_env
from launcher_runs import launch, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # launches the DeepSpeed launcher and signals real processes
DS = os.path.join(os.path.dirname(sys.executable), "deepspeed")


@pytest.fixture(scope="module")
def dataset(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def straight(launcher_run):
    return launcher_run


def test_launcher_run_output_and_checkpoint(straight):
    _, out, ck = straight
    assert "world 2 = TP 1 x PP 1 x DP 2" in out and "global 8" in out
    lines = [l for l in out.splitlines() if l.startswith("iteration ")]
    assert len(lines) == 6
    for name in ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1", "lr", "grad norm",
                 "samples/s", "TFLOP/s/device", "mem"):
        assert name in lines[-1]
    assert (ck / "latest").read_text() == "iter_0000006"
    # saved at 2, 4, 6; the tiny recipe's keep_last 2 removed the oldest
    assert sorted(p for p in os.listdir(ck) if p.startswith("iter_")) == ["iter_0000004", "iter_0000006"]
    assert f"checkpoint: {ck / 'iter_0000006'}" in out


def test_exact_resume_after_a_kill_during_save(dataset, straight, tmp_path):
    """Three proofs on one interrupted run (2 processes, ZeRO-1): (1) ``kill -9`` inside a save keeps the previous
    checkpoint as ``latest`` and the next launch resumes from it; (2) 3 iterations, exit, resume, 3 more give
    every logged loss, lr and grad norm bit-identical to 6 straight ones, even with a killed attempt between;
    (3) the same checkpoint resumed on one process (DP 2 -> DP 1, accumulating 2 micro-batches) consumes the
    uninterrupted run's samples (the elastic data order, issue 28): its losses equal the straight run's."""
    import shutil

    ck = tmp_path / "b"
    b1 = launch(dataset, ck, "--train-iters", 6, "--exit-interval", 3, "--metrics-file", tmp_path / "b.jsonl")
    assert b1.returncode == 0, b1.stderr[-3000:]
    assert "--exit-interval reached: saved at iteration 3" in b1.stdout
    shutil.copytree(ck, tmp_path / "one")
    killed = launch(dataset, ck, "--train-iters", 6, "--load", ck, OV3_FAULT_KILL_IN_SAVE="1")
    assert killed.returncode != 0
    assert (ck / "latest").read_text() == "iter_0000003"
    assert (ck / "iter_0000006.partial").is_dir() and not (ck / "iter_0000006").exists()
    b2 = launch(dataset, ck, "--train-iters", 6, "--load", ck, "--metrics-file", tmp_path / "b.jsonl")
    assert b2.returncode == 0, b2.stderr[-3000:]
    assert "resumed from" in b2.stdout and "at iteration 3" in b2.stdout
    assert (ck / "latest").read_text() == "iter_0000006"
    ma, mb = straight[0], metrics(tmp_path / "b.jsonl")
    assert [m["iteration"] for m in mb] == [1, 2, 3, 4, 5, 6]
    keys = ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1", "lr", "grad_norm")
    for x, y in zip(ma, mb):
        for k in keys:
            assert x[k] == y[k], (x["iteration"], k, x[k], y[k])
    assert ma[-1]["total_loss"] < ma[0]["total_loss"]
    one = launch(dataset, tmp_path / "one", "--train-iters", 6, "--load", tmp_path / "one", "--metrics-file",
                 tmp_path / "one.jsonl", gpus=1)
    assert one.returncode == 0 and "resumed from" in one.stdout, one.stderr[-3000:]
    assert "world 1 = TP 1 x PP 1 x DP 1" in one.stdout and "restarts" not in one.stdout
    mc = metrics(tmp_path / "one.jsonl")
    assert [m["iteration"] for m in mc] == [4, 5, 6]
    for x, y in zip(ma[3:], mc):  # the same samples; another reduction order of the same gradients
        for k in keys[:-2]:
            assert abs(x[k] - y[k]) <= 1e-4 * max(1.0, abs(x[k])), (x["iteration"], k, x[k], y[k])


def test_sigterm_saves_and_exits_0(dataset, tmp_path):
    """A real signal to a real process (in-process would signal pytest itself)."""
    env = subprocess_env(ROOT)
    cmd = [sys.executable, "-u", "-m", "megatron_ov3.pretrain", "--data-path", dataset[0], "--tokenizer",
           dataset[1], "--tiny-vae", "--image-size", "32", "--micro-batch-size", "4", "--global-batch-size", "4",
           "--train-iters", "100000", "--log-interval", "1", "--num-workers", "1", "--save", str(tmp_path / "ck")]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 240
    for line in p.stdout:
        lines.append(line)
        if line.startswith("iteration ") or time.time() > deadline:
            break
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=120)
    out = "".join(lines) + rest
    assert p.returncode == 0, out[-3000:]
    assert "signal received: saved at iteration" in out
    assert (tmp_path / "ck" / "latest").read_text().startswith("iter_")


def test_usage_errors_exit_2(dataset, tmp_path):
    """In-process (the same main and cli.run as the command line); the real command line's wiring is proven by
    the launcher tests in this file."""
    def run(*flags):
        return run_inprocess("-m", "megatron_ov3.pretrain", *flags)

    base = ["--data-path", dataset[0], "--tokenizer", dataset[1], "--tiny-vae", "--train-iters", "2"]
    r = run(*base, "--micro-batch-size", 3, "--global-batch-size", 8)
    assert r.returncode == 2 and "not divisible by --micro-batch-size 3" in r.stderr, r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith("error:")]) == 1
    r = run(*base, "--micro-batch-size", 4, "--global-batch-size", 8, "--zero-stage", 5)
    assert r.returncode == 2 and "invalid choice: 5" in r.stderr
    r = run(*base, "--micro-batch-size", 4, "--global-batch-size", 8, "--save-interval", 2)
    assert r.returncode == 2 and "--save-interval needs --save" in r.stderr
    r = run(*base[:-1], "0", "--micro-batch-size", 4, "--global-batch-size", 8)
    assert r.returncode == 2 and "--train-iters / --train-samples must be >= 1" in r.stderr, r.stderr
    r = run(*base, "--micro-batch-size", 4, "--global-batch-size", 8, "--sequence-parallel")
    assert r.returncode == 2 and "--sequence-parallel needs --tensor-model-parallel-size > 1" in r.stderr
    init = tmp_path / "imported"
    init.mkdir()
    (init / "meta.json").write_text('{"model_config": {"position_embedding_type": "learned"}}')
    r = run(*base, "--micro-batch-size", 4, "--global-batch-size", 4, "--init-universal", init)
    assert r.returncode == 2 and "set --position-embedding-type to match" in r.stderr, r.stderr[-2000:]
    r = run("--help")
    assert r.returncode == 0
    for group in ("model:", "data:", "batch and schedule:", "parallelism:", "layers and precision:", "checkpointing:",
                  "logging:"):
        assert group in r.stdout


@pytest.mark.parametrize("how", ["deepspeed", "bash"])
def test_huge_recipe_starts_through_launcher(tmp_path, how):
    """`deepspeed examples/pretrain_ov3_huge.sh` (and `bash ...`) reach the entry point with the recipe's flags."""
    env = dict(os.environ, DATA_PATH="d/{0..9}.tar", TOKENIZER="t.model", VAE_PATH="vae", PYTHONPATH=ROOT,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    cmd = [DS, "--master_port", str(free_port()), "examples/pretrain_ov3_huge.sh", "--help"] if how == "deepspeed" \
        else ["bash", "examples/pretrain_ov3_huge.sh", "--help"]
    if how == "bash":
        env["NUM_GPUS"] = "1"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Pre-train an OpenVision 3 encoder" in r.stdout and "layers and precision:" in r.stdout


def _mock_run(tmp_path, name, *flags, nproc=1):
    """2 iterations of the tiny model on --mock-data (the same samples under any layout); (metrics, stdout). One
    process runs in-process (the entry point's main, as run_inprocess does); more go through the launcher."""
    out = tmp_path / f"{name}.jsonl"
    args = ["megatron_ov3.pretrain", "--mock-data", "--tiny-vae", "--image-size", "32", "--micro-batch-size", "4",
            "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1", "--metrics-file", str(out),
            *map(str, flags)]
    if nproc == 1:
        r = run_inprocess("-m", *args)
    else:
        r = subprocess.run([DS, "--num_gpus", str(nproc), "--master_port", str(free_port()), "--module", *args],
                           cwd=ROOT, env=subprocess_env(ROOT), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return metrics(out), r.stdout


def _assert_close(got, ref, rel):
    for k in ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1"):
        assert abs(got[0][k] - ref[0][k]) <= rel * abs(ref[0][k]) + 1e-3, (k, got[0][k], ref[0][k])
    assert all(m["grad_norm"] > 0 for m in got)


@pytest.fixture(scope="module")
def fp32_reference(tmp_path_factory):
    return _mock_run(tmp_path_factory.mktemp("fp32"), "fp32")[0]


def test_bf16_step_tracks_fp32(tmp_path, fp32_reference):
    """The recipe's precision (--bf16: bf16 megatron layers under DeepSpeed's bf16 engine with fp32 masters, the
    VAE decode under bf16 autocast) runs on CPU and its first losses stay close to the fp32 run's."""
    bf16, _ = _mock_run(tmp_path, "bf16", "--bf16", "--vae-autocast-bf16", "--vae-channels-last")
    _assert_close(bf16, fp32_reference, 0.02)


def test_torchao_fp8_compiled_tp2_sp_tracks_fp32(tmp_path, fp32_reference):
    """--fp8-format with the local backend (torchao float8, emulated on CPU) and --torch-compile, under TP2 with
    sequence parallelism through the launcher: both converters are applied and the first losses stay within
    FP8's error of the one-process fp32 run."""
    got, out = _mock_run(tmp_path, "fp8", "--transformer-impl", "local", "--fp8-format", "hybrid", "--torch-compile",
                         "--tensor-model-parallel-size", 2, "--sequence-parallel", nproc=2)
    assert "fp8-hybrid (torchao float8, emulated on CPU): 28 linears" in out, out[-2000:]
    assert "torch.compile: 7 transformer layers" in out and "layers: local/sdpa compiled" in out
    _assert_close(got, fp32_reference, 0.05)


def test_finetune_stage_starts_its_own_schedule(tmp_path):
    """--finetune-from (the next resolution stage) keeps the weights and, with --keep-optimizer, Adam's
    moments - but starts its own iteration count and learning-rate schedule, the same as a fresh run's."""
    ck = tmp_path / "stage1"
    _mock_run(tmp_path, "stage1", "--lr", "1e-3", "--lr-warmup-iters", "1", "--min-lr", "1e-5",
              "--train-iters", "3", "--save", ck)
    stage2 = ["--image-size", "64", "--lr", "5e-4", "--lr-warmup-iters", "2", "--train-iters", "2"]
    fresh, _ = _mock_run(tmp_path, "fresh", *stage2)
    for keep in ([], ["--keep-optimizer"]):
        got, out = _mock_run(tmp_path, f"stage2{len(keep)}", *stage2, "--finetune-from", ck, *keep)
        assert "stage start from" in out and f"optimizer {'kept' if keep else 'reset'}" in out, out[-2000:]
        assert [m["iteration"] for m in got] == [1, 2]
        assert [m["lr"] for m in got] == pytest.approx([m["lr"] for m in fresh], rel=1e-9), keep
        assert got[0]["total_loss"] != pytest.approx(fresh[0]["total_loss"], rel=1e-6)  # trained weights


def rank_errors(stderr: str, words: str) -> list:
    """Each rank's ``error:`` message holding ``words`` (two ranks writing at once can share one line of the
    launcher's output)."""
    return [part for part in stderr.split("error: ")[1:] if words in part]


def test_a_bad_latest_is_the_same_line_on_every_rank(dataset, tmp_path):
    """'latest' naming no checkpoint, 2 ranks: each rank ends with the same one line (rank 1 used to die in a gloo
    'Connection closed by peer' traceback while rank 0 printed the line). A real launch: the point is two ranks."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "latest").write_text("iter_0000009")
    r = launch(dataset, ck, "--train-iters", 2, "--load", ck)
    errors = rank_errors(r.stderr, "points to 'iter_0000009', which is not a complete checkpoint")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 2, r.stderr[-3000:]


def test_nothing_usable_stops_both_ranks_with_one_line(dataset, tmp_path):
    """A captions-only source through the launcher with 2 ranks (was a silent hang that SIGTERM could not end):
    every rank stops with the line naming the source, within 2 minutes. A real launch: the point is two ranks."""
    from helpers import tar_of

    for j in range(2):
        tar_of(tmp_path / f"c-{j}.tar", [(f"{i:04d}.txt", b"a red circle") for i in range(10)])
    t = time.time()
    r = launch((str(tmp_path / "c-{0..1}.tar"), dataset[1]), tmp_path / "ck", "--train-iters", 2, timeout=180)
    errors = rank_errors(r.stderr, "were all unusable (missing_image")
    assert r.returncode != 0 and time.time() - t < 120, r.stderr[-3000:]
    assert len(errors) == 2, r.stderr[-3000:]
