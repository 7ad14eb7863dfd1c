"""Run inside a patched LLaVA tree (PYTHONPATH puts it first): LLaVA-1.5's own training path with an OV3 export as
the vision tower and a tiny randomly initialised Llama; prints one JSON line of what the test checks."""
import json
import sys
import types

import torch
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model import LlavaLlamaForCausalLM
from llava.model.language_model.llava_llama import LlavaConfig
from llava.mm_utils import process_images


def main(export):
    torch.manual_seed(0)
    cfg = LlavaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)
    model = LlavaLlamaForCausalLM(cfg)
    # what llava/train/train.py passes to initialize_vision_modules for the v1.5 recipe
    args = types.SimpleNamespace(vision_tower=export, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                                 pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat",
                                 mm_projector_type="mlp2x_gelu", image_aspect_ratio="pad")
    model.get_model().initialize_vision_modules(model_args=args)
    tower = model.get_vision_tower()
    model.requires_grad_(False)
    for p in model.get_model().mm_projector.parameters():  # stage 1 (pretrain.sh): only the projector trains
        p.requires_grad_(True)
    model.config.image_aspect_ratio = "pad"
    pics = [Image.new("RGB", (48, 30), (200, 30, 30)), Image.new("RGB", (20, 40), (30, 30, 200))]
    images = process_images(pics, tower.image_processor, model.config)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9], [1, 6, IMAGE_TOKEN_INDEX, 7, 8, 10]])
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels, images=images, attention_mask=torch.ones_like(ids, dtype=torch.bool))
    out.loss.backward()
    proj_grad = sum(float(p.grad.abs().sum()) for p in model.get_model().mm_projector.parameters())
    feats = tower(images)
    print(json.dumps({"tower": type(tower).__name__, "mm_hidden_size": model.config.mm_hidden_size,
                      "hidden_size": tower.hidden_size, "num_patches": tower.num_patches,
                      "image_shape": list(images.shape), "logits_len": out.logits.shape[1], "text_len": ids.shape[1],
                      "loss": float(out.loss), "projector_grad": proj_grad,
                      "tower_grads": any(p.grad is not None for p in tower.parameters()),
                      "feature_shape": list(feats.shape), "feature_requires_grad": feats.requires_grad,
                      "image_mean": list(tower.image_processor.image_mean)}))


if __name__ == "__main__":
    main(sys.argv[1])
