"""Field metadata for configuration dataclasses: which fields are command-line options and under which flag.

A config field becomes a flag by carrying ``metadata=cli(...)``; its help text is the attribute docstring
written under it (read once from the class source), its type and default come from the field itself. So a
new option is one field, and :mod:`megatron_ov3.config` builds the parser from the tree. A leaf module: it
imports nothing of the package, so ``models/`` and ``data/`` may use it.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
from typing import Dict, Optional, Sequence


def cli(flag: Optional[str] = None, *, choices: Optional[Sequence] = None, aliases: Sequence[str] = (),
        metavar: Optional[str] = None, low: Optional[float] = None, high: Optional[float] = None,
        low_open: bool = False, high_open: bool = False) -> dict:
    """Metadata marking a dataclass field as a command-line option. ``flag`` defaults to ``--field-name``.
    ``low``/``high`` bound a number (or every number of a list), inclusive unless ``low_open``/``high_open``;
    :func:`check_numbers` enforces them, and finiteness of every float, for flags and files alike."""
    return {"cli": {"flag": flag, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases),
                    "metavar": metavar, "range": (low, high, low_open, high_open)}}


def _range_text(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def number_error(f: dataclasses.Field, value) -> Optional[str]:
    """Why ``value`` is not a valid number for the flagged field ``f`` (None when it is, or is not a number)."""
    rng = f.metadata.get("cli", {}).get("range", (None, None, False, False))
    low, high, low_open, high_open = rng
    for x in (value if isinstance(value, (list, tuple)) else [value]):
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        bad = isinstance(x, float) and not math.isfinite(x)
        bad = bad or (low is not None and (x <= low if low_open else x < low))
        bad = bad or (high is not None and (x >= high if high_open else x > high))
        if bad:
            want = _range_text(*rng)
            each = "each value " if isinstance(value, (list, tuple)) else ""
            return f"{each}must be a finite number{' ' + want if want else ''}"
    return None


def check_numbers(obj) -> None:
    """Every flagged number of the dataclass ``obj`` is finite and within its field's declared range: the one
    rule for numbers, so ``--dry-run`` refuses what a launch would (a usage error naming the flag)."""
    from .errors import UsageError

    for f in dataclasses.fields(obj):
        if "cli" not in f.metadata:
            continue
        value = getattr(obj, f.name)
        why = number_error(f, value)
        if why:
            raise UsageError(f"{flag_of(f)} {value!r} {why}")


def flag_of(f: dataclasses.Field) -> Optional[str]:
    """The flag of a field marked with :func:`cli` (None when it is not an option)."""
    meta = f.metadata.get("cli")
    if meta is None:
        return None
    return meta["flag"] or "--" + f.name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> Dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field), joined to one line each."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
