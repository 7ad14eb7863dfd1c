"""Register the OV3 tower in a LLaVA-1.5 tree (haotian-liu/LLaVA, or the ``llava`` package of ``llava-torch``).

Two edits, both idempotent: ``llava_ov3_tower.py`` is copied into ``llava/model/multimodal_encoder/``, and
``builder.py`` gets the OV3 branch *before* the CLIP branch (which accepts any existing local path, an OV3 export
included)::

    from .llava_ov3_tower import OV3VisionTower, is_ov3_tower
    ...
        if is_ov3_tower(vision_tower):
            return OV3VisionTower(vision_tower, args=vision_tower_cfg, **kwargs)

After that LLaVA's own scripts (``scripts/v1_5/pretrain.sh``, ``finetune.sh``) take an export folder as
``--vision_tower``.
"""
from __future__ import annotations

import os
import shutil
from typing import List

from ..errors import MissingFile, UsageError

TOWER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llava_ov3_tower.py")
IMPORT = "from .llava_ov3_tower import OV3VisionTower, is_ov3_tower\n"
BRANCH = ("    if is_ov3_tower(vision_tower):  # megatron_ov3: an OV3 export (before the CLIP branch)\n"
          "        return OV3VisionTower(vision_tower, args=vision_tower_cfg, **kwargs)\n")
ANCHOR = "    vision_tower = getattr(vision_tower_cfg"


def encoder_dir(llava: str) -> str:
    """``llava/model/multimodal_encoder`` under a LLaVA checkout, its ``llava`` package, or that folder itself."""
    for sub in ("llava/model/multimodal_encoder", "model/multimodal_encoder", ""):
        d = os.path.join(llava, sub)
        if os.path.isfile(os.path.join(d, "builder.py")) and os.path.isfile(os.path.join(d, "clip_encoder.py")):
            return d
    raise MissingFile(f"{llava!r} holds no LLaVA multimodal_encoder/builder.py; give the LLaVA checkout, its llava "
                      f"package, or 'installed'")


def patch_llava(llava: str) -> List[str]:
    """Apply both edits; returns what changed (empty when the tree was patched already)."""
    d = encoder_dir(llava)
    done = []
    target = os.path.join(d, "llava_ov3_tower.py")
    if not os.path.isfile(target) or open(target).read() != open(TOWER).read():
        shutil.copyfile(TOWER, target)
        done.append(f"copied llava_ov3_tower.py to {d}")
    path = os.path.join(d, "builder.py")
    lines = open(path).read().splitlines(keepends=True)
    if any("is_ov3_tower" in line for line in lines):
        return done
    at = next((i for i, line in enumerate(lines) if line.startswith(ANCHOR)), None)
    first_import = next((i for i, line in enumerate(lines) if line.startswith(("from ", "import "))), None)
    if at is None or first_import is None:
        raise UsageError(f"{path} does not look like LLaVA-1.5's builder.py (no '{ANCHOR.strip()}' line); add the "
                         f"OV3 branch by hand (see megatron_ov3/export/llava_patch.py)")
    lines.insert(at + 1, BRANCH)
    lines.insert(first_import, IMPORT)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    done.append(f"added the OV3 branch to {path}")
    return done
