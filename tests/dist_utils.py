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
        from megatron_ov3.cli import release_shared_memory

        release_shared_memory()  # DeepSpeed's CPU all-reduce buffer of this rank, as the entry points do


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


class Result:
    """What :func:`run_inprocess` returns: the fields of ``subprocess.CompletedProcess`` that tests read."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


_MODULES: dict = {}


def _entry_point(target: str, module: bool):
    """The ``main`` of ``-m MODULE`` or of ``tools/X.py`` (loaded once, as ``python tools/X.py`` would)."""
    import importlib
    import importlib.util
    import os
    import sys

    if module:
        return importlib.import_module(target).main
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, target)
    if path not in _MODULES:
        tools_dir = os.path.dirname(path)
        if tools_dir not in sys.path:
            sys.path.append(tools_dir)  # for `import _bootstrap`, as when the script runs
        spec = importlib.util.spec_from_file_location(f"_ov3_tool_{os.path.basename(path)[:-3]}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[path] = mod
    return _MODULES[path].main


def run_inprocess(*args, env=None) -> Result:
    """``run_python``'s in-process twin for usage errors, ``--help``, ``--dry-run`` and config errors: the same
    ``main(argv)`` through ``cli.run`` (what ``exit_with`` does), from the checkout root, ``env`` added to the
    environment, output captured; the environment, working directory, signal handlers and this process's own
    process group (when a test made one) are kept. Saves a Python + torch start-up per call; one subprocess test
    per entry point (``run_python``) keeps proving the wiring of the real command line."""
    import contextlib
    import io
    import os
    import signal

    import torch.distributed as dist

    from megatron_ov3 import cli

    args = [str(a) for a in args]
    module = args[0] == "-m"
    main = _entry_point(args[1] if module else args[0], module)
    argv = args[2:] if module else args[1:]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved_env, cwd = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    shutdown = cli._shutdown_distributed
    if dist.is_available() and dist.is_initialized():  # the session's group: not the command's to destroy
        cli._shutdown_distributed = lambda barrier: None
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(root)
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.run(main, argv)
            except SystemExit as e:  # argparse: --help (0) and its own errors (2)
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        cli._shutdown_distributed = shutdown
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, h in handlers.items():
            signal.signal(s, h)
    return Result(rc, out.getvalue(), err.getvalue())
