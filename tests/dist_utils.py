"""Run a function on N gloo processes (each test passes its own port and a timeout)."""
from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp


def _entry(rank, world, port, fn, args, errq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, port: int, *args, timeout: float = 180.0) -> None:
    """Spawn ``world`` processes running ``fn(rank, world, *args)``; raise with the first traceback."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, errq)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if not errq.empty():
        rank, tb = errq.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    if alive:
        raise TimeoutError(f"{len(alive)} of {world} processes still running after {timeout}s")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise AssertionError(f"process exit codes {bad}")


def subprocess_env(root: str, **extra) -> dict:
    """Environment for a child run of the package: this checkout on PYTHONPATH and no launcher variables
    inherited from the test process (the child decides for itself whether it was launched)."""
    import os

    env = dict(os.environ, PYTHONPATH=root)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port nobody listens on now (each multi-process test takes its own)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(*args, timeout: float = 300):
    """``python ARGS`` (a module with ``-m`` or a tool path) from the checkout root, output captured."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, *map(str, args)], cwd=root, env=subprocess_env(root),
                          capture_output=True, text=True, timeout=timeout)


def one_error(r) -> str:
    """The single ``error:`` line of a usage error (exit 2, no traceback)."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    return errors[0]
