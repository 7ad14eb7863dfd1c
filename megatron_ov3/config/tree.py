"""Generic machinery of the configuration tree: flags from dataclass fields, config files, merging, JSON.

A *tree* is a mapping ``{section name: dataclass type}``. Every field that carries ``metadata=cli(...)``
(:mod:`megatron_ov3.options`) becomes one command-line flag whose help is the field's docstring; every field
(flagged or not) can be set from a YAML or TOML file as ``section: {field: value}``. Values are merged
defaults <- file <- command line, as lingua and torchtitan do. This module knows nothing about OV3; the
sections live in :mod:`megatron_ov3.config.job`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Dict, Mapping, Optional

from ..errors import MissingFile, UsageError
from ..options import field_docs, flag_of

Tree = Mapping[str, type]


def _unwrap(hint):
    """(base type, is Optional, is List) of a field's type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
        origin = typing.get_origin(hint)
    if origin in (list, typing.List):
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def flag_fields(cls):
    """(field, flag) of every flagged field of a dataclass, in declaration order."""
    return [(f, flag_of(f)) for f in dataclasses.fields(cls) if flag_of(f)]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def add_flags(parser: argparse.ArgumentParser, section: str, cls, title: str,
              defaults: Optional[Mapping[str, Any]] = None) -> None:
    """Add one argument group with a flag per flagged field of ``cls``; values land in ``section.field``.
    Defaults are suppressed (only given flags appear), so a file value is overridden only by a given flag.
    ``defaults`` changes the default shown in the help (a tool whose defaults differ, e.g. the benchmark)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(title)
    for f, flag in flag_fields(cls):
        meta = f.metadata["cli"]
        base, optional, is_list = _unwrap(hints[f.name])
        default = (defaults or {}).get(f.name, _default(f))
        text = docs.get(f.name, "")
        kw: Dict[str, Any] = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                                  help=f"{text} (default: {default})".replace("%", "%%"))
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _none_or(base) if optional else base
            if is_list:
                kw["nargs"] = "+"
            if meta["choices"]:
                kw["choices"] = meta["choices"] + ((None,) if optional else ())
                kw["metavar"] = "{" + ",".join(map(str, meta["choices"] + (("none",) if optional else ()))) + "}"
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        group.add_argument(flag, *meta["aliases"], **kw)


def _none_or(base):
    """argparse type of an Optional field: 'none' clears it (e.g. a file's value), anything else is parsed."""
    def parse(text: str):
        return None if text.lower() == "none" else base(text)

    parse.__name__ = base.__name__  # argparse names the type in its error message
    return parse


def parse_text(cls, name: str, text: str):
    """A field's value from a string (an environment override), by the field's type."""
    base, optional, is_list = _unwrap(typing.get_type_hints(cls)[name])
    try:
        if optional and text.lower() == "none":
            return None
        if base is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes", "on")
        return [base(x) for x in text.split()] if is_list else base(text)
    except ValueError:
        raise UsageError(f"{name} = {text!r} is not a valid {base.__name__}") from None


def interpolate(raw: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``${section.field}`` inside string values is replaced by that (merged) value, e.g.
    ``tensorboard_dir: ${checkpoint.save}/tensorboard``; a reference to an unset value is a usage error."""
    import re

    ref = re.compile(r"\$\{(\w+)\.(\w+)\}")

    def sub(m):
        value = raw.get(m.group(1), {}).get(m.group(2))
        if value is None:
            raise UsageError(f"${{{m.group(1)}.{m.group(2)}}} is referenced but not set")
        return str(value)

    return {s: {k: ref.sub(sub, v) if isinstance(v, str) else v for k, v in vals.items()} for s, vals in raw.items()}


def cli_overrides(ns: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """The flags given on the command line as ``{section: {field: value}}``."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def read_file(path: str, _seen: tuple = ()) -> Dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) config file as a dict of sections. A top-level ``base: FILE``
    (relative to this file) is read first and this file's values override it, section by section (the
    ``env`` section too), so recipes share one source of their common values."""
    data = _read_one(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UsageError(f"--config {path!r}: base must be a file name, got {base!r}")
    parent = os.path.join(os.path.dirname(path), base)
    if os.path.abspath(parent) in _seen + (os.path.abspath(path),):
        raise UsageError(f"--config {path!r}: base files form a cycle through {parent!r}")
    merged = read_file(parent, _seen + (os.path.abspath(path),))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _read_one(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise MissingFile(f"--config {path!r} does not exist; give a YAML or TOML file")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            with open(path, "rb") as f:
                data = tomllib.load(f)
        elif ext in (".yaml", ".yml"):
            import yaml

            with open(path) as f:
                data = yaml.safe_load(f) or {}
        else:
            raise UsageError(f"--config {path!r}: unknown extension {ext!r}; use .yaml, .yml or .toml")
    except UsageError:
        raise
    except Exception as e:  # yaml/toml syntax errors: the file is bad input
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--config {path!r} is not valid {ext[1:].upper()}: {first}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path!r} must hold a mapping of sections (e.g. 'train: {{...}}')")
    return data


def check_keys(tree: Tree, raw: Mapping[str, Any], where: str, extra: Mapping[str, set] = None) -> None:
    """Unknown sections or fields (e.g. a typo in a config file) are usage errors naming the known ones."""
    for section, values in raw.items():
        if section not in tree:
            raise UsageError(f"{where}: unknown section {section!r}; known: {', '.join(tree)}")
        if not isinstance(values, dict):
            raise UsageError(f"{where}: section {section!r} must be a mapping of field: value")
        known = {f.name for f in dataclasses.fields(tree[section])} | (extra or {}).get(section, set())
        bad = sorted(set(values) - known)
        if bad:
            raise UsageError(f"{where}: unknown field(s) {bad} in section {section!r}; known: {sorted(known)}")


def check_types(cls, values: Mapping[str, Any], where: str) -> None:
    """Values from a file must have the field's type (ints are accepted for floats)."""
    hints = typing.get_type_hints(cls)
    for name, v in values.items():
        base, optional, is_list = _unwrap(hints[name])
        if v is None and optional:
            continue
        items = v if is_list and isinstance(v, list) else [v]
        ok = (not is_list or isinstance(v, list)) and all(_is(x, base) for x in items)
        if not ok:
            raise UsageError(f"{where}: {name} = {v!r} is not of type {getattr(hints[name], '__name__', hints[name])}")


def _is(x, base) -> bool:
    if base is float:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if base is int:
        return isinstance(x, int) and not isinstance(x, bool)
    if base in (str, bool):
        return isinstance(x, base)
    return True  # nested dataclasses (towers) are checked by their own constructors


def merge(*layers: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Later layers override earlier ones, field by field."""
    out: Dict[str, Dict[str, Any]] = {}
    for layer in layers:
        for section, values in layer.items():
            out.setdefault(section, {}).update(values)
    return out


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str)
