"""Bad input, table-driven: every case of the adversarial review (issue 32) that this suite covers ends as one line
naming the problem and the fix, exit code 2, nothing on disk changed (or, where accepting is right, the reason is
written next to the case). In-process (``run_inprocess``), so the table stays cheap as it grows; the command-line
wiring is proven by test_entry_points.py. The README's Reliability section counts these cases."""
import json
import os
import shutil
import time

import pytest

from conftest import TINY_TRAIN
from dist_utils import one_error, run_inprocess

DRY = [*TINY_TRAIN, "--train-iters", "1", "--dry-run"]

# (case id, argv, words the one error line must hold, extra environment)
NUMBERS = [
    ("lr-nan", DRY + ["--lr", "nan"], "--lr nan must be a finite number > 0", None),
    ("lr-inf", DRY + ["--lr", "inf"], "--lr inf must be a finite number > 0", None),
    ("beta1-1.5", DRY + ["--adam-beta1", "1.5"], "--adam-beta1 1.5 must be a finite number >= 0 and < 1", None),
    ("eps-negative", DRY + ["--adam-eps", "-1"], "--adam-eps -1.0 must be a finite number > 0", None),
    ("weight-decay-nan", DRY + ["--weight-decay", "nan"], "--weight-decay nan must be", None),
    ("clip-grad-nan", DRY + ["--clip-grad", "nan"], "--clip-grad nan must be", None),  # was: clipping silently off
    ("data-weights-nan", DRY + ["--data-weights", "nan", "1"], "--data-weights [nan, 1.0] each value must be", None),
    ("tp3-4-heads", DRY + ["--tensor-model-parallel-size", "3"], "does not divide the encoder's 4 heads",
     {"WORLD_SIZE": "3"}),  # --dry-run refuses what the launch refuses
    ("unknown-flag", DRY + ["--learning-rate", "1"], "unrecognized arguments: --learning-rate", None),
]


@pytest.mark.parametrize("case,argv,words,env", NUMBERS, ids=[c[0] for c in NUMBERS])
def test_flags(case, argv, words, env):
    r = run_inprocess(*argv, env=env)
    err = one_error(r)
    assert words in err, err
    assert "usage:" not in r.stderr  # the error alone, not argparse's usage block


@pytest.mark.parametrize("text,words", [
    ("model: {image_size: '64'}\n", "image_size = '64' is not of type int"),
    ("optim: {lr: .nan}\n", "--lr nan must be a finite number"),
    ("optim: {adam_beta2: 1.0}\n", "--adam-beta2 1.0 must be a finite number >= 0 and < 1"),
])
def test_config_files_follow_the_same_rule(tmp_path, text, words):
    (tmp_path / "job.yaml").write_text(text)
    argv = [a for a in DRY if a not in ("--image-size", "32")]  # the file gives it
    assert words in one_error(run_inprocess(*argv, "--config", tmp_path / "job.yaml"))


def _snapshot(folder):
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(folder) for f in fs}


def test_init_checkpoint_never_writes_into_a_run_or_a_used_folder(trained_ckpt, tmp_path):
    run = shutil.copytree(trained_ckpt, tmp_path / "run")
    before = _snapshot(run)
    err = one_error(run_inprocess("tools/init_checkpoint.py", "--image-size", 32, "--output", run / "iter_0000002"))
    assert "--output" in err and "iter_0000002" in err and "new or empty folder" in err, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert "notes.txt" in one_error(run_inprocess("tools/init_checkpoint.py", "--output", tmp_path / "mine"))
    assert _snapshot(run) == before


def test_a_universal_copy_of_another_iteration_is_refused(trained_ckpt, universal_init, tmp_path):
    """What the review did by hand (random weights copied into a run's iter_N/universal) is refused by every
    reader, not exported as the run's weights."""
    run = shutil.copytree(trained_ckpt, tmp_path / "run")
    shutil.copytree(universal_init, run / "iter_0000002" / "universal")  # records iteration 0
    err = one_error(run_inprocess("tools/convert_to_hf.py", "--load", run, "--output", tmp_path / "hf"))
    assert "records iteration 0, not iter_0000002's" in err, err
    assert not (tmp_path / "hf").exists()


def test_evaluate_refuses_a_tokenizer_of_another_vocabulary(trained_ckpt, tiny_data, tmp_path):
    """The checkpoint was trained on --mock-data's 512-token vocabulary; tiny_data's tokenizer is smaller."""
    from megatron_ov3.data import Tokenizer

    ck = shutil.copytree(trained_ckpt, tmp_path / "ck")  # a reader writes the universal copy into it
    err = one_error(run_inprocess("tools/evaluate.py", "--load", ck, "--data-path", tiny_data[0],
                                  "--tokenizer", tiny_data[1], "--output", tmp_path / "ev"))
    n = Tokenizer(tiny_data[1]).vocab_size
    assert f"has {n} tokens" in err and "512-token vocabulary" in err, err
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("kind", ["captions-only", "zero-byte-jpgs"])
def test_training_on_a_source_with_nothing_usable_exits_2_quickly(tmp_path, tiny_data, kind):
    """Was a silent endless hang (and SIGTERM could not stop it: the step never finished)."""
    from helpers import tar_of

    members = [m for i in range(10) for m in [(f"{i:04d}.txt", b"a red circle")]
               + ([(f"{i:04d}.jpg", b"")] if kind == "zero-byte-jpgs" else [])]
    shards = [tar_of(tmp_path / f"bad-{j}.tar", members) for j in range(2)]
    t = time.time()
    err = one_error(run_inprocess("-m", "megatron_ov3.pretrain", "--data-path", str(tmp_path / "bad-{0..1}.tar"),
                                  "--tokenizer", tiny_data[1], "--tiny-vae", "--image-size", 32, "--micro-batch-size",
                                  2, "--global-batch-size", 2, "--train-iters", 2, "--num-workers", 1))
    assert time.time() - t < 120 and "all unusable" in err and shards[0] in err, err


@pytest.mark.parametrize("flag", ["--tensorboard-dir", "--metrics-file"])
def test_run_output_paths(tmp_path, flag):
    """A --tensorboard-dir that is a file is refused; a --metrics-file in a folder that does not exist yet is
    accepted (the folder is made, as tensorboard makes its own): a new run's log folder is normal."""
    if flag == "--tensorboard-dir":
        (tmp_path / "tb").write_text("x")
        err = one_error(run_inprocess(*TINY_TRAIN, "--train-iters", 1, flag, tmp_path / "tb"))
        assert "is a file" in err and (tmp_path / "tb").read_text() == "x"
        return
    r = run_inprocess(*TINY_TRAIN, "--train-iters", 1, flag, tmp_path / "new" / "m.jsonl")
    assert r.returncode == 0 and json.loads((tmp_path / "new" / "m.jsonl").read_text().splitlines()[0])["iteration"]


def _bytes_file(path, data=b"\x00\x9f\x92\x96 not text \xff" * 50):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ["image-size-0", "not-a-tar", "scaling-factor-0", "no-cuda"])
def test_cache_latents_refuses_before_writing(tmp_path, tiny_data, case):
    """Each once wrote empty or all-zero latent shards with exit 0 (or a traceback for the device)."""
    import torch

    if case == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda:0 is valid here")
    data = str(_bytes_file(tmp_path / "x.tar")) if case == "not-a-tar" else tiny_data[0]
    extra = {"image-size-0": ["--image-size", 0], "scaling-factor-0": ["--vae-scaling-factor", 0],
             "no-cuda": ["--device", "cuda:0"]}.get(case, [])
    argv = ["tools/cache_latents.py", "--data-path", data, "--output-dir", tmp_path / "lat", "--tiny-vae",
            "--image-size", 32, *extra]
    words = {"image-size-0": "positive multiple of 16", "not-a-tar": "is not a tar file",
             "scaling-factor-0": "--vae-scaling-factor 0.0 must be a finite number > 0",
             "no-cuda": "no CUDA device here"}[case]
    assert words in one_error(run_inprocess(*argv))
    assert not (tmp_path / "lat").exists()


def test_tokenizer_tool_keeps_an_existing_model_and_refuses_binary_text(tmp_path, tiny_data):
    tok = shutil.copy(tiny_data[1], tmp_path / "tok.model")
    before = open(tok, "rb").read()
    (tmp_path / "s.txt").write_text("a red circle\n" * 50)
    err = one_error(run_inprocess("tools/train_tokenizer.py", "--text-file", tmp_path / "s.txt", "--output-prefix",
                                  tmp_path / "tok", "--vocab-size", 16))
    assert "tok.model exists" in err and open(tok, "rb").read() == before
    err = one_error(run_inprocess("tools/train_tokenizer.py", "--text-file", _bytes_file(tmp_path / "b.txt"),
                                  "--output-prefix", tmp_path / "new", "--vocab-size", 16))
    assert "is not UTF-8 text" in err and not (tmp_path / "new.model").exists()


def test_checkpoint_verify_without_a_manifest_is_not_called_intact(trained_ckpt, tmp_path):
    run = shutil.copytree(trained_ckpt, tmp_path / "run")
    (run / "iter_0000002" / "manifest.json").unlink()
    f = run / "iter_0000002" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    r = run_inprocess("tools/checkpoint.py", "verify", run)
    assert "cannot be verified (no manifest)" in one_error(r) and "NOT VERIFIABLE" in r.stdout


@pytest.mark.parametrize("case", ["lpips-not-weights", "table-of-bytes", "scaling-output-file",
                                  "convert-output-file"])
def test_more_former_tracebacks(tmp_path, universal_init, case):
    junk = _bytes_file(tmp_path / "junk.pth")
    argv, words = {
        "lpips-not-weights": (["tools/evaluate.py", "--load", universal_init, "--data-path", "x.tar", "--tokenizer",
                               "t.model", "--output", tmp_path / "ev", "--lpips-path", junk],
                              "could not be read as weights"),
        "table-of-bytes": (["tools/make_shards.py", "--input-table", _bytes_file(tmp_path / "t.csv"),
                            "--output-dir", tmp_path / "o"], "is not UTF-8 CSV/TSV text"),
        "scaling-output-file": (["tools/scaling_study.py", "--output", junk], "is a file"),
        "convert-output-file": (["tools/convert_to_hf.py", "--load", universal_init, "--output", junk], "is a file"),
    }[case]
    assert words in one_error(run_inprocess(*argv))
    assert junk.read_bytes() == b"\x00\x9f\x92\x96 not text \xff" * 50


def test_a_save_folder_that_cannot_be_written_is_found_before_training():
    """/proc refuses new files even for root (a read-only folder for an ordinary user is the same case); it was
    a traceback at the first save, after training."""
    err = one_error(run_inprocess(*TINY_TRAIN, "--train-iters", 1, "--save", "/proc/megatron_ov3_no_such_run"))
    assert "--save '/proc/megatron_ov3_no_such_run' is not writable here" in err, err


@pytest.mark.parametrize("where", ["/proc/megatron_ov3_no_such_copy", "file"])
def test_to_universal_output_that_cannot_take_the_copy(trained_ckpt, tmp_path, where):
    out = where if where.startswith("/") else _bytes_file(tmp_path / "f")
    err = one_error(run_inprocess("tools/checkpoint.py", "to-universal", trained_ckpt, "--output", out))
    assert ("is not writable here" if where.startswith("/") else "is not an empty folder") in err, err


def test_a_malformed_json_sample_is_counted_and_training_goes_on(tmp_path, tiny_data):
    """A KEY.json holding a JSON list (no .txt) was an AttributeError that killed a 2-rank job before iteration 1."""
    import io

    from PIL import Image

    from helpers import tar_of

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "blue").save(buf, "JPEG")
    members = [m for i in range(24) for m in [(f"{i:04d}.jpg", buf.getvalue()),
                                               (f"{i:04d}.json", b'["a", "list"]' if i % 3 == 0 else
                                                b'{"caption": "a blue square"}')]]
    for j in range(2):
        tar_of(tmp_path / f"j-{j}.tar", members)
    r = run_inprocess("-m", "megatron_ov3.pretrain", "--data-path", str(tmp_path / "j-{0..1}.tar"), "--tokenizer",
                      tiny_data[1], "--tiny-vae", "--image-size", 32, "--micro-batch-size", 2, "--global-batch-size", 2,
                      "--train-iters", 2, "--log-interval", 1, "--num-workers", 1, "--no-augment")
    assert r.returncode == 0 and "missing_caption" in r.stdout, (r.stdout[-2000:], r.stderr[-2000:])


def test_tools_chain_on_the_folder_init_checkpoint_was_given(universal_init, mp1):
    """``tools/init_checkpoint.py --output INIT`` prints INIT/universal; export, evaluation and --init-universal
    take INIT too (the folder the user named), not only INIT/universal."""
    from megatron_ov3.checkpointing import load_model
    from megatron_ov3.checkpointing.load import resolve_universal

    parent = os.path.dirname(str(universal_init))
    assert resolve_universal(parent) == str(universal_init)
    model, meta = load_model(parent, with_vae=False)  # an init checkpoint names no VAE
    assert meta["model_config"] and sum(p.numel() for p in model.parameters()) > 0
