"""Checkpoint conversion: megatron_ov3 (any TP/PP layout) -> Hugging Face / LLaVA / RAE / open_clip, and
open_clip -> megatron_ov3.

Every source is read through the checkpoint's *universal* copy (checkpointing/universal.py): global parameter names,
tensor-parallel shards already merged, pipeline stages already renumbered, so conversion is pure renaming plus
one re-layout: megatron's fused QKV stores rows per head as [q_h; k_h; v_h], the exported blocks (and open_clip's
``in_proj``) store [q; k; v].
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Optional, Tuple

import torch
from ..checkpointing.load import resolve_universal, vae_from_meta
from ..errors import MissingFile, UsageError

HERE = os.path.dirname(os.path.abspath(__file__))
ADAPTER_FILES = ("modeling_ov3.py", "llava_ov3_tower.py", "rae_ov3.py")
TARGETS = ("hf", "llava", "rae", "open_clip")

_LAYER_MAP = [  # megatron (local or TE spec) suffix -> exported block suffix
    ("input_layernorm.weight", "ln_1.weight"), ("input_layernorm.bias", "ln_1.bias"),
    ("self_attention.linear_qkv.layer_norm_weight", "ln_1.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "ln_1.bias"),
    ("self_attention.linear_qkv.weight", "qkv.weight"), ("self_attention.linear_qkv.bias", "qkv.bias"),
    ("self_attention.linear_proj.weight", "proj.weight"), ("self_attention.linear_proj.bias", "proj.bias"),
    ("pre_mlp_layernorm.weight", "ln_2.weight"), ("pre_mlp_layernorm.bias", "ln_2.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "ln_2.weight"), ("mlp.linear_fc1.layer_norm_bias", "ln_2.bias"),
    ("mlp.linear_fc1.weight", "fc1.weight"), ("mlp.linear_fc1.bias", "fc1.bias"),
    ("mlp.linear_fc2.weight", "fc2.weight"), ("mlp.linear_fc2.bias", "fc2.bias"),
]
_TOWERS = {"encoder": "vision", "text": "text", "latent_decoder": "latent_decoder"}


def qkv_to_standard(t: torch.Tensor, heads: int) -> torch.Tensor:
    """megatron [heads, (q,k,v), d, ...] rows -> [(q,k,v), heads, d, ...]."""
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, d, *rest).transpose(0, 1).reshape(3 * heads * d, *rest).contiguous()


def qkv_to_megatron(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    d = t.shape[0] // (3 * heads)
    return t.reshape(3, heads, d, *rest).transpose(0, 1).reshape(3 * heads * d, *rest).contiguous()


# ---------------------------------------------------------------- reading a megatron_ov3 checkpoint
def load_source(path: str, progress: bool = True) -> Tuple[dict, Dict[str, torch.Tensor], dict]:
    """(OV3Config dict, {global name: fp32 tensor} of model weights, meta) from a megatron_ov3 checkpoint."""
    from tqdm import tqdm

    from ..checkpointing import read_universal
    from ..models import OV3Config

    uni = resolve_universal(path)
    meta, handles = read_universal(uni)
    cfg = meta.get("model_config")
    if cfg is None:
        raise UsageError(f"{uni!r} has no model_config in meta.json; re-save it with this version")
    cfg = OV3Config.from_saved(cfg).to_dict()  # current field names and values (older checkpoints included)
    weights = {}
    for k in tqdm(sorted(k for k in handles if "::" not in k), desc="reading", unit="tensor", disable=not progress):
        weights[k] = handles[k].get_tensor(k).float()
    return cfg, weights, meta


# ---------------------------------------------------------------- megatron -> exported (HF) names
def to_hf_state_dict(cfg: dict, weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    heads = {"encoder": cfg["encoder"]["heads"], "text": cfg["text"]["heads"],
             "latent_decoder": cfg["decoder"]["heads"]}
    out = {}
    for name, t in weights.items():
        tower = name.split(".", 1)[0]
        if tower not in _TOWERS:
            continue  # the caption decoder and logit scale are training-only
        m = re.match(r"^(\w+)\.block\.layers\.(\d+)\.(.+)$", name)
        if m:
            suffix = dict(_LAYER_MAP).get(m.group(3))
            if suffix is None:
                raise UsageError(f"unexpected layer parameter {name!r}")
            if suffix.startswith("qkv."):
                t = qkv_to_standard(t, heads[tower])
            out[f"{_TOWERS[tower]}.layers.{m.group(2)}.{suffix}"] = t
        else:
            out[_TOWERS[tower] + name[len(tower):]] = t
    return out


def hf_config(cfg: dict, meta: dict) -> dict:
    from ..models.text import padded_vocab_size

    vae = meta.get("vae", {})
    return {
        "model_type": "ov3", "architectures": ["OV3Model"],
        "auto_map": {"AutoConfig": "modeling_ov3.OV3Config", "AutoModel": "modeling_ov3.OV3Model"},
        "encoder": cfg["encoder"], "decoder": cfg["decoder"], "text": cfg["text"], "embed_dim": cfg["embed_dim"],
        "image_size": cfg["image_size"], "latent_channels": cfg["latent_channels"],
        "vae_downsample": cfg["vae_downsample"], "patch_size": cfg["vae_downsample"] * cfg["patch_size"],
        "latent_patch_size": cfg["patch_size"],
        "class_token": cfg["class_token"], "register_tokens": cfg["register_tokens"],
        "pos_embed_ref_grid": cfg["pos_embed_ref_grid"], "pos_embed_type": cfg["position_embedding_type"],
        "final_ln_after_pool": cfg["final_ln_after_pool"],
        "layernorm_eps": cfg["layernorm_eps"], "vocab_size": cfg["vocab_size"],
        "padded_vocab_size": padded_vocab_size(cfg["vocab_size"]), "text_context_length": cfg["text_context_length"],
        "pad_id": cfg["pad_id"], "scaling_factor": vae.get("scaling_factor", 0.3611),
        "shift_factor": vae.get("shift_factor", 0.1159), "logit_scale": meta.get("logit_scale"),
        "decoder_noise_norm": cfg["decoder_noise_norm"], "decoder_noise_tau": cfg["decoder_noise_tau"],
        "torch_dtype": "float32",
    }


def export_hf(src: str, out_dir: str, vae_path: Optional[str] = None, progress: bool = True) -> str:
    """Write a transformers-loadable export (config, safetensors, image processor, VAE, modeling code)."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    cfg, weights, meta = load_source(src, progress)
    require_empty(out_dir)
    if "logit_scale" in weights:
        meta = dict(meta, logit_scale=float(weights["logit_scale"].exp().clamp(max=cfg["logit_scale_max"])))
    vae = vae_from_meta(meta, vae_path)
    meta = dict(meta, vae={"scaling_factor": vae.scaling_factor, "shift_factor": vae.shift_factor})
    os.makedirs(out_dir, exist_ok=True)
    sd = to_hf_state_dict(cfg, weights)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, meta), f, indent=1)
    s = cfg["image_size"]
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3, resample=3, do_convert_rgb=True).save_pretrained(out_dir)
    vae.save_pretrained(os.path.join(out_dir, "vae"))
    for f in ADAPTER_FILES:
        shutil.copy(os.path.join(HERE, f), os.path.join(out_dir, f))
    from .rae_handoff import write_export_files

    write_export_files(out_dir, sd)
    return out_dir


# ---------------------------------------------------------------- open_clip (official OV3 release format)
def _sincos_table(cfg: dict) -> torch.Tensor:
    from ..models.posemb import sincos_2d

    grid = cfg["image_size"] // (cfg["vae_downsample"] * cfg["patch_size"])
    return sincos_2d(cfg["encoder"]["width"], grid, cfg["pos_embed_ref_grid"]).clone()


def _open_clip_positions(cfg: dict, weights: dict) -> torch.Tensor:
    """open_clip's (1 + grid^2, W) ``positional_embedding`` (class position first) at the export resolution."""
    from ..models.posemb import resize_table

    w = cfg["encoder"]["width"]
    if cfg["position_embedding_type"] != "learned":
        return torch.cat([torch.zeros(1, w), _sincos_table(cfg)])
    grid = cfg["image_size"] // (cfg["vae_downsample"] * cfg["patch_size"])
    return torch.cat([weights["encoder.class_pos_embed"].float(),
                      resize_table(weights["encoder.pos_embed"].float(), grid)])


def export_open_clip(src: str, out_dir: str, progress: bool = True) -> str:
    """``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` with ``visual.*`` keys, as released for OV3
    (class token, no pre-LN, bias-free conv1/proj, avg pool with final LN after pooling, 16 input channels)."""
    cfg, weights, _ = load_source(src, progress)
    if not cfg["class_token"] or cfg["register_tokens"]:
        raise UsageError("the open_clip format needs a model trained with a class token and no register tokens "
                         "(--class-token, --register-tokens 0)")
    if not cfg["final_ln_after_pool"]:
        raise UsageError("the open_clip OV3 format pools before the final LayerNorm (final_ln_after_pool)")
    e = cfg["encoder"]
    w = e["width"]
    sd = {
        "visual.conv1.weight": weights["encoder.patch_embed.weight"],
        "visual.class_embedding": weights["encoder.class_token"].reshape(w),
        "visual.positional_embedding": _open_clip_positions(cfg, weights),
        "visual.ln_post.weight": weights["encoder.final_norm.weight"],
        "visual.ln_post.bias": weights["encoder.final_norm.bias"],
        "visual.proj": weights["encoder.proj.weight"].t().contiguous(),
    }
    hf = to_hf_state_dict(cfg, {k: v for k, v in weights.items() if k.startswith("encoder.block.")})
    names = {"ln_1": "ln_1", "qkv": "attn.in_proj", "proj": "attn.out_proj", "ln_2": "ln_2", "fc1": "mlp.c_fc",
             "fc2": "mlp.c_proj"}
    for k, v in hf.items():
        _, _, i, mod, kind = k.split(".")
        key = f"visual.transformer.resblocks.{i}.{names[mod]}"
        key = f"{key}_{kind}" if mod == "qkv" else f"{key}.{kind}"
        sd[key] = v
    grid_latent = cfg["image_size"] // cfg["vae_downsample"]
    config = {"model_cfg": {"embed_dim": cfg["embed_dim"], "vision_cfg": {
        "image_size": grid_latent, "patch_size": cfg["patch_size"], "width": w, "layers": e["depth"],
        "head_width": w // e["heads"], "mlp_ratio": e["mlp"] / w, "in_channels": cfg["latent_channels"],
        "no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True, "output_tokens": True,
        "patch_dropout": 0.0, "ls_init_value": None}},
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "image_size": cfg["image_size"]}}
    require_empty(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in sd.items()}, os.path.join(out_dir, "open_clip_pytorch_model.bin"))
    with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return out_dir


def require_empty(out_dir: str) -> None:
    """Exports never write into a folder that holds anything (nothing on disk is overwritten)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--output {out_dir!r} is a file; give a new or empty folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UsageError(f"output folder {out_dir!r} is not empty; choose a new one")


def import_open_clip(src_dir: str, out_dir: str, model_size: str = "custom", **overrides) -> str:
    """open_clip OV3 vision checkpoint -> a universal checkpoint (encoder weights) to start training from with
    ``--init-universal``. The other towers start from scratch (the release ships the vision tower only)."""
    from safetensors.torch import save_file

    from ..models import OV3Config, TowerConfig, get_config

    cfg_path = os.path.join(src_dir, "open_clip_config.json")
    bin_path = os.path.join(src_dir, "open_clip_pytorch_model.bin")
    for p in (cfg_path, bin_path):
        if not os.path.isfile(p):
            raise MissingFile(f"{p!r} not found; an open_clip OV3 folder has open_clip_config.json and "
                                    f"open_clip_pytorch_model.bin")
    mc = json.load(open(cfg_path))["model_cfg"]
    vc = mc["vision_cfg"]
    sd = torch.load(bin_path, map_location="cpu", weights_only=True)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    w, depth = int(vc["width"]), int(vc["layers"])
    heads = w // int(vc.get("head_width", 64))
    enc = TowerConfig(w, depth, int(round(w * float(vc.get("mlp_ratio", 4.0)))), heads)
    patch = int(vc.get("patch_size", 2))
    base = get_config(model_size).to_dict() if model_size != "custom" else get_config("B").to_dict()
    base.update(encoder=enc, embed_dim=int(mc["embed_dim"]), class_token=True, register_tokens=0,
                patch_size=patch, image_size=int(vc["image_size"]) * 8, size=model_size)
    base.update(overrides)
    pos = sd["visual.positional_embedding"].float()
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid + 1 != pos.shape[0] or pos.shape[1] != w:
        raise UsageError(f"visual.positional_embedding has shape {tuple(pos.shape)}; expected (1 + g*g, {w})")
    sincos = OV3Config.from_dict(dict(base, position_embedding_type="sincos")).to_dict()
    expect = torch.cat([torch.zeros(1, w), _sincos_table(sincos)])
    learned = pos.shape != expect.shape or not torch.allclose(pos, expect, atol=1e-5)
    if learned:  # e.g. the official OV3 release: keep the table, trainable, at the grid it was trained at
        base.update(position_embedding_type="learned", pos_embed_ref_grid=grid)
    cfg = OV3Config.from_dict(base)
    mt = {"encoder.patch_embed.weight": sd["visual.conv1.weight"],
          "encoder.class_token": sd["visual.class_embedding"].reshape(1, 1, w),
          "encoder.final_norm.weight": sd["visual.ln_post.weight"],
          "encoder.final_norm.bias": sd["visual.ln_post.bias"],
          "encoder.proj.weight": sd["visual.proj"].t()}
    if learned:
        mt["encoder.class_pos_embed"], mt["encoder.pos_embed"] = pos[:1], pos[1:]
    back = {"ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
            "attn.in_proj_weight": "self_attention.linear_qkv.weight",
            "attn.in_proj_bias": "self_attention.linear_qkv.bias",
            "attn.out_proj.weight": "self_attention.linear_proj.weight",
            "attn.out_proj.bias": "self_attention.linear_proj.bias",
            "ln_2.weight": "pre_mlp_layernorm.weight", "ln_2.bias": "pre_mlp_layernorm.bias",
            "mlp.c_fc.weight": "mlp.linear_fc1.weight", "mlp.c_fc.bias": "mlp.linear_fc1.bias",
            "mlp.c_proj.weight": "mlp.linear_fc2.weight", "mlp.c_proj.bias": "mlp.linear_fc2.bias"}
    for i in range(depth):
        for a, b in back.items():
            t = sd[f"visual.transformer.resblocks.{i}.{a}"]
            if b.startswith("self_attention.linear_qkv"):
                t = qkv_to_megatron(t, heads)
            mt[f"encoder.block.layers.{i}.{b}"] = t
    require_empty(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in mt.items()}, os.path.join(out_dir, "stage0.safetensors"))
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"pipeline_stages": 1, "tensor_parallel": 1, "data_parallel": 1, "iteration": 0,
                   "consumed_samples": 0, "source": f"open_clip import of {src_dir}", "partial": True,
                   "model_config": cfg.to_dict()}, f, indent=1)
    return out_dir
