"""The one error type for bad user input (a leaf module: everything may import it, it imports nothing)."""


class UsageError(ValueError):
    """Bad input from the user (flags, config files, paths, data files): reported as one line, exit code 2.

    Only this type is treated as a usage error; every other exception is an internal error and keeps its
    traceback."""


class MissingFile(UsageError, FileNotFoundError):
    """A file or folder the user named does not exist (still a ``FileNotFoundError`` for callers)."""


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to fewer than ``limit`` characters (with "..."), for one-line error messages."""
    text = repr(value)
    return text if len(text) < limit else text[:limit - 3] + "..."
