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
import textwrap
from typing import Dict, Optional, Sequence


def cli(flag: Optional[str] = None, *, choices: Optional[Sequence] = None, aliases: Sequence[str] = (),
        metavar: Optional[str] = None) -> dict:
    """Metadata marking a dataclass field as a command-line option. ``flag`` defaults to ``--field-name``."""
    return {"cli": {"flag": flag, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases),
                    "metavar": metavar}}


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
