"""Shared CLI behaviour: usage errors become one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
    """Bad input from the user (flags, paths, files); reported as one line, exit code 2."""


USER_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError)


def run(main, argv=None) -> int:
    """Call ``main(argv)``; user errors print ``error: <message>`` and return 2."""
    try:
        rc = main(argv)
    except USER_ERRORS as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    return int(rc or 0)


def exit_with(main):
    sys.exit(run(main))


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (argparse's own behaviour, kept explicit)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
