"""The tiny recipe through the real DeepSpeed launcher, as users run it (``deepspeed --num_gpus 2
examples/pretrain_ov3_tiny.sh`` with the recipe's overrides in the environment); shared by the training and the
multi-node tests, whose runs are compared loss for loss with the session's one straight run (``launcher_run``)."""
import json
import os
import subprocess
import sys

from dist_utils import free_port, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def recipe_env(dataset, ckpt, **extra):
    """What a user sets on the launching machine for the tiny recipe (none of it is forwarded by DeepSpeed's
    multi-node runners; the launcher hook turns it into flags)."""
    return subprocess_env(ROOT, DATA_PATH=dataset[0], TOKENIZER=dataset[1], CHECKPOINT_PATH=str(ckpt),
                          IMAGE_SIZE="32", MICRO_BATCH="4", GLOBAL_BATCH="8", NUM_WORKERS="1",
                          PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **extra)


def launch(dataset, ckpt, *flags, timeout=300, gpus=2, **extra):
    """``deepspeed --num_gpus GPUS examples/pretrain_ov3_tiny.sh --log-interval 1 FLAGS`` on one host. A run that
    finished leaves none of DeepSpeed's CPU all-reduce buffers in /dev/shm (``cli.release_shared_memory``)."""
    port = free_port()
    cmd = [DS, "--num_gpus", str(gpus), "--master_port", str(port), "examples/pretrain_ov3_tiny.sh",
           "--log-interval", "1", *map(str, flags)]
    r = subprocess.run(cmd, cwd=ROOT, env=recipe_env(dataset, ckpt, **extra), capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode == 0 and os.path.isdir("/dev/shm"):
        left = [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer_")
                and f.rsplit("_", 2)[-2] == str(port)]
        assert not left, f"the run left DeepSpeed's shared-memory buffers behind: {left}"
    return r


def metrics(path):
    return [json.loads(line) for line in open(path)]


def straight_run(dataset, d):
    """6 uninterrupted iterations, saving every 2: (metrics, stdout, checkpoint folder)."""
    r = launch(dataset, d / "ck", "--train-iters", 6, "--save-interval", 2, "--metrics-file", d / "a.jsonl")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return metrics(d / "a.jsonl"), r.stdout, d / "ck"
