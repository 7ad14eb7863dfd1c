"""One rule for every tool's output folder: nothing is ever silently mixed into a folder of other files.

* a new or empty folder is claimed for the tool (``.megatron_ov3.json`` records which tool);
* a folder that the same tool claimed before is reused: the tool replaces or extends only its own files (what
  each tool does there is documented with its ``--output`` flag);
* anything else is refused with one line naming a file that is not the tool's, before anything is written.

``pretrain --save`` follows the same rule with the checkpoint layout as its claim
(:func:`megatron_ov3.checkpointing.format.check_save_folder`); ``convert_to_hf`` needs a new or empty folder.
"""
from __future__ import annotations

import json
import os

from .errors import UsageError

MARKER = ".megatron_ov3.json"


def _owner(path: str):
    try:
        return json.load(open(os.path.join(path, MARKER))).get("tool")
    except (OSError, ValueError, AttributeError):
        return None


def claim(path: str, tool: str, flag: str) -> None:
    """Make ``path`` ``tool``'s output folder, or refuse (see the module docstring)."""
    if check_claim(path, tool, flag):
        return
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f"{MARKER}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"tool": tool}, f)
    os.replace(tmp, os.path.join(path, MARKER))


def check_claim(path: str, tool: str, flag: str) -> bool:
    """Refuse ``path`` now, writing nothing, if :func:`claim` would (a tool checks its output folder before its
    other inputs and claims it after them). True when it is already ``tool``'s."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file; give a folder (new or empty)")
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    owner = _owner(path) if MARKER in entries else None
    if owner == tool:
        return True
    if entries:
        what = f"was written by {owner}" if owner else f"holds files {tool} did not write (e.g. {entries[0]!r})"
        raise UsageError(f"{flag} {path!r} {what}; give a new or empty folder so nothing is mixed or overwritten")
    return False
