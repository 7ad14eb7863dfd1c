"""OV3 vision tower for LLaVA-1.5 (haotian-liu/LLaVA). Copy this file into
``llava/model/multimodal_encoder/`` (it is written into every megatron_ov3 export) and, in ``builder.py``,
check for OV3 *before* the CLIP branch (which accepts any existing local path)::

    from .llava_ov3_tower import OV3VisionTower, is_ov3_tower
    if is_ov3_tower(vision_tower):
        return OV3VisionTower(vision_tower, args=vision_tower_cfg, **kwargs)

Feature selection follows CLIPVisionTower: ``mm_vision_select_layer`` indexes the hidden states (Hugging Face
indexing, -2 by default); ``patch`` drops the prefix tokens (the class token and registers; OV3 trained without
a class token has none, so all 256 patch tokens remain), ``cls_patch`` keeps them.
"""
import json
import os

import torch
from torch import nn


def is_ov3_tower(path) -> bool:
    cfg = os.path.join(str(path), "config.json")
    return os.path.isfile(cfg) and json.load(open(cfg)).get("model_type") == "ov3"


class OV3VisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        from transformers import AutoConfig

        self.cfg_only = AutoConfig.from_pretrained(vision_tower, trust_remote_code=True)
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()

    def load_model(self, device_map=None):
        if self.is_loaded:
            return
        from transformers import AutoModel, CLIPImageProcessor

        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        self.vision_tower = AutoModel.from_pretrained(self.vision_tower_name, trust_remote_code=True,
                                                      device_map=device_map)
        self.vision_tower.load_vae()
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def feature_select(self, outputs):
        feats = outputs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            return feats[:, self.config.num_prefix_tokens:]
        if self.select_feature == "cls_patch":
            return feats
        raise ValueError(f"Unexpected select feature: {self.select_feature}")

    @torch.no_grad()
    def forward(self, images):
        if isinstance(images, list):  # as CLIPVisionTower: one (1, N, C) per image
            return [self.forward(im.unsqueeze(0)) for im in images]
        out = self.vision_tower(pixel_values=images.to(device=self.device, dtype=self.dtype),
                                output_hidden_states=True)
        return self.feature_select(out).to(images.dtype)

    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device

    @property
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_patches_per_side(self):
        return self.config.image_size // self.config.patch_size  # patch_size: pixels per token

    @property
    def num_patches(self):
        return self.num_patches_per_side ** 2
