"""A JIT-build lock left by a killed run no longer hangs later launches."""
import os
import threading
import time

from megatron_ov3.parallel.build_lock import build_lock_path, clear_stale_build_locks


def test_stale_lock_is_removed_with_a_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = build_lock_path("deepspeed_shm_comm")
    assert lock.startswith(str(tmp_path))
    open(lock, "w").close()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    lines = []
    assert clear_stale_build_locks(lines.append) == [lock] and not os.path.exists(lock)
    assert "removed a stale build lock" in lines[0] and lock in lines[0]


def test_a_build_in_progress_is_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = build_lock_path("deepspeed_shm_comm")
    open(lock, "w").close()  # a build that finishes (removes its lock) after 1 s
    threading.Timer(1.0, os.remove, (lock,)).start()
    lines, t0 = [], time.time()
    assert clear_stale_build_locks(lines.append, poll=0.1) == []
    assert 0.9 < time.time() - t0 < 10 and "waiting for" in lines[0]


def test_a_young_lock_becomes_stale_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = build_lock_path("deepspeed_shm_comm")
    open(lock, "w").close()
    lines = []
    assert clear_stale_build_locks(lines.append, stale_after=1.0, poll=0.1) == [lock]
    assert "waiting for" in lines[0] and "removed a stale build lock" in lines[1]


def test_the_environments_own_ninja_comes_first(tmp_path, monkeypatch):
    """A rank started over ssh has the login PATH (a system ninja of another version, which makes torch rebuild
    DeepSpeed's op at every switch): the Python environment's bin folder goes first when it holds a ninja."""
    import os

    from megatron_ov3.parallel.build_lock import prefer_environment_ninja

    env_bin = tmp_path / "venv" / "bin"
    env_bin.mkdir(parents=True)
    python = env_bin / "python"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert not prefer_environment_ninja(str(python))  # no ninja in the environment: PATH untouched
    assert os.environ["PATH"] == "/usr/bin:/bin"
    (env_bin / "ninja").write_text("")
    assert prefer_environment_ninja(str(python))
    assert os.environ["PATH"] == f"{env_bin}:/usr/bin:/bin"
    assert not prefer_environment_ninja(str(python))  # already first: once
