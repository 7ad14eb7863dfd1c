"""Shared CLI behaviour: usage errors become one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys


from .errors import MissingFile, UsageError  # noqa: F401  (re-exported: tools import them from here)


def _shutdown_distributed(barrier: bool) -> None:
    """Tear the process group down before the interpreter exits: left to interpreter shutdown, gloo's threads
    can be destroyed while still joinable ("terminate called without an active exception", exit 250)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def run(main, argv=None) -> int:
    """Call ``main(argv)``; a :class:`UsageError` prints ``error: <message>`` and returns 2. Any other exception
    is an internal error and propagates with its traceback. A process group the command created is destroyed
    before returning."""
    try:
        rc = main(argv)
    except UsageError as e:
        msg = str(e)
        print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        _shutdown_distributed(barrier=False)
        return 2
    _shutdown_distributed(barrier=True)
    return int(rc or 0)


def exit_with(main):
    sys.exit(run(main))


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2: the error and where the options are listed, without
    argparse's usage block (dozens of lines for the training flags) in front of it."""

    def error(self, message):
        print(f"error: {message} (every option: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
