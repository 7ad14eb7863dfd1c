"""The RAE (bytetriper/RAE) hand-off: the files an export carries for RAE, the stage-1/stage-2 values that follow
from it, and the two edits that let RAE's config-driven build take an OV3 export.

* Export (every HF-family export): ``rae/decoder.pt`` (the OV3 latent decoder's weights under RAE's decoder-slot
  names, plain tensors: RAE's ``pretrained_decoder_path``) and ``rae/rae_stage1.yaml`` (:func:`rae_settings`).
* ``tools/rae_stats.py --export DIR --data-path ...``: ``rae/stat.pt``, the per-token mean/variance RAE
  normalises latents with.
* ``tools/rae_handoff.py patch --rae RAE``: copies ``rae_ov3.py`` and ``modeling_ov3.py`` into RAE's ``src/`` and
  appends one line to ``src/stage1/decoders/__init__.py`` (:data:`DECODER_LINE`), which puts OV3 in RAE's
  decoder slot and OV3RAEEncoder in its encoder registry.
* ``tools/rae_handoff.py config --export DIR --base RAE_STAGE2.yaml``: a ready RAE stage-2 config, the base with
  :func:`rae_settings` merged in.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Any, Dict, List

from ..errors import MissingFile, UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
DECODER_LINE = ("from rae_ov3 import GeneralDecoder  # noqa  megatron_ov3: OV3 exports in RAE's decoder slot "
                "(tools/rae_handoff.py patch)\n")


def rae_settings(export: str) -> Dict[str, Any]:
    """The RAE config sections that follow from an export: stage_1 (the RAE built from the export), the DiT's
    input grid and channels, the latent size and the time-shift dimension."""
    export = os.path.abspath(export)
    path = os.path.join(export, "config.json")
    if not os.path.isfile(path) or json.load(open(path)).get("model_type") != "ov3":
        raise MissingFile(f"{export!r} is not a megatron_ov3 export (no config.json of model_type ov3)")
    cfg = json.load(open(path))
    stride = cfg.get("patch_size", 16) if cfg.get("latent_patch_size") else cfg["vae_downsample"] * cfg["patch_size"]
    grid, width = cfg["image_size"] // stride, cfg["encoder"]["width"]
    return {
        "stage_1": {"target": "stage1.RAE", "params": {
            "encoder_cls": "OV3RAEEncoder", "encoder_config_path": export, "encoder_input_size": cfg["image_size"],
            "encoder_params": {"path": export}, "decoder_config_path": export, "decoder_patch_size": stride,
            "pretrained_decoder_path": os.path.join(export, "rae", "decoder.pt"),
            "noise_tau": 0.0,  # stage 2 encodes clean images (RAE's stage-2 configs: 0.0)
            "reshape_to_2d": True, "normalization_stat_path": os.path.join(export, "rae", "stat.pt")}},
        "stage_2": {"params": {"input_size": grid, "patch_size": 1, "in_channels": width}},
        "misc": {"latent_size": [width, grid, grid], "time_dist_shift_dim": grid * grid * width},
    }


def write_export_files(export: str, hf_state: Dict[str, Any]) -> None:
    """``rae/decoder.pt`` and ``rae/rae_stage1.yaml`` into an export folder."""
    import torch
    import yaml

    os.makedirs(os.path.join(export, "rae"), exist_ok=True)
    dec = {"decoder." + k[len("latent_decoder."):]: v.contiguous() for k, v in hf_state.items()
           if k.startswith("latent_decoder.")}
    if dec:
        torch.save(dec, os.path.join(export, "rae", "decoder.pt"))
    with open(os.path.join(export, "rae", "rae_stage1.yaml"), "w") as f:
        cfg = json.load(open(os.path.join(export, "config.json")))
        f.write("# RAE settings that follow from this export (paths as exported; re-derive after a move with\n"
                "# tools/rae_handoff.py config). stat.pt comes from tools/rae_stats.py.\n"
                f"# OV3 trained its decoder with noise tau {cfg.get('decoder_noise_tau', 0.0)} on "
                f"{'LayerNorm-normalised' if cfg.get('decoder_noise_norm') == 'layernorm' else 'raw'} encoder tokens,\n"
                "# the tokens OV3RAEEncoder returns: to train RAE's decoder as OV3 did, set stage_1.params.noise_tau "
                "to it.\n")
        yaml.safe_dump(rae_settings(export), f, sort_keys=False)


def merge(base: Dict[str, Any], settings: Dict[str, Any]) -> Dict[str, Any]:
    """``settings`` into a copy of an RAE config: stage_1 replaced whole, the other sections key by key."""
    out = copy.deepcopy(base)
    out["stage_1"] = copy.deepcopy(settings["stage_1"])
    for section in ("stage_2", "misc"):
        target = out.setdefault(section, {})
        values = settings[section]
        if section == "stage_2":
            target = target.setdefault("params", {})
            values = values["params"]
        target.update(values)
    return out


def patch_rae(rae: str) -> List[str]:
    """Copy the adapter files into RAE's ``src/`` and add :data:`DECODER_LINE` (idempotent)."""
    src = os.path.join(rae, "src") if os.path.isdir(os.path.join(rae, "src")) else rae
    init = os.path.join(src, "stage1", "decoders", "__init__.py")
    if not os.path.isfile(init) or not os.path.isfile(os.path.join(src, "stage1", "rae.py")):
        raise MissingFile(f"{rae!r} is not an RAE checkout (no src/stage1/rae.py and stage1/decoders/__init__.py)")
    done = []
    for name in ("rae_ov3.py", "modeling_ov3.py"):
        target = os.path.join(src, name)
        if not os.path.isfile(target) or open(target).read() != open(os.path.join(HERE, name)).read():
            shutil.copyfile(os.path.join(HERE, name), target)
            done.append(f"copied {name} to {src}")
    text = open(init).read()
    if "from rae_ov3 import GeneralDecoder" not in text:
        if "GeneralDecoder" not in text:
            raise UsageError(f"{init} does not define RAE's GeneralDecoder; add {DECODER_LINE.strip()!r} by hand")
        with open(init, "a") as f:
            f.write(("" if text.endswith("\n") else "\n") + DECODER_LINE)
        done.append(f"registered OV3 in {init}")
    return done
