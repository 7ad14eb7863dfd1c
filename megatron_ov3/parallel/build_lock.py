"""No hang on a stale JIT-build lock.

DeepSpeed JIT-builds its CPU shared-memory comm op on first use (``deepspeed.init_distributed``), through torch's
``FileBaton``: a ``lock`` file in the op's build folder that every other process waits on, forever, until it
disappears. A run killed during that build leaves the file behind, and every later launch on the machine then
hangs without a word. Before DeepSpeed starts, :func:`clear_stale_build_locks` waits for a lock to go away (a
build in progress takes seconds to a minute or two) and removes it once it is older than any build takes,
saying which file it removed.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, List, Optional

OPS = ("deepspeed_shm_comm",)
"""DeepSpeed ops the training job JIT-builds."""
STALE_AFTER_S = 600.0
"""A lock this old is left by a killed build (a build takes ~25 s on 2 CPU cores)."""


def prefer_environment_ninja(executable: Optional[str] = None) -> bool:
    """Put this Python's own bin folder first on PATH when it holds a ``ninja`` (pip installs one beside torch).

    torch's JIT build runs the first ``ninja`` on PATH, and two ninja versions (e.g. the environment's 1.13 and a
    system 1.11) read each other's build log as stale: every switch rebuilds DeepSpeed's op (about a minute on 2
    cores). Ranks started over ssh by DeepSpeed's multi-node runners get the login PATH, without the environment,
    so a mixed job rebuilt the op at every launch. Returns whether PATH changed."""
    bindir = os.path.dirname(os.path.abspath(executable or sys.executable))
    path = os.environ.get("PATH", "")
    if not os.path.isfile(os.path.join(bindir, "ninja")) or path.split(os.pathsep)[0] == bindir:
        return False
    os.environ["PATH"] = bindir + os.pathsep + path
    return True


def build_lock_path(op: str) -> str:
    """Where torch's cpp_extension keeps ``op``'s build lock (``TORCH_EXTENSIONS_DIR`` or torch's default)."""
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.join(_get_build_directory(op, verbose=False), "lock")


def clear_stale_build_locks(log: Callable[[str], None] = print, stale_after: float = STALE_AFTER_S,
                            poll: float = 1.0) -> List[str]:
    """Wait while a young lock exists; remove it once older than ``stale_after``. Returns the removed paths."""
    removed = []
    for op in OPS:
        lock, told = build_lock_path(op), False
        while True:
            try:
                age = time.time() - os.path.getmtime(lock)
            except FileNotFoundError:
                break
            if age >= stale_after:
                try:
                    os.remove(lock)
                    removed.append(lock)
                    log(f"removed a stale build lock {lock} ({age / 60:.0f} min old, left by a run killed while "
                        f"DeepSpeed JIT-built its {op} op)")
                except FileNotFoundError:
                    pass
                break
            if not told:
                log(f"note: waiting for {lock} ({age:.0f} s old): another process is building DeepSpeed's {op} op; "
                    f"it is removed as stale after {stale_after / 60:.0f} min")
                told = True
            time.sleep(poll)
    return removed
