"""Export trained tiny checkpoints (saved with TP2 and with PP2) and load them the way downstream users do:
transformers AutoModel (offline, trust_remote_code), the LLaVA tower, the RAE encoder/decoder, open_clip's
state dict (forward re-implemented with torch.nn.MultiheadAttention) and the open_clip round trip."""
import importlib.util
import json
import os
import sys

import pytest

from dist_utils import run_inprocess
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # its checkpoints come from the layout runs' launches
DS = os.path.join(os.path.dirname(sys.executable), "deepspeed")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=["TP2", "PP2"])
def ckpt(request, layout_runs):
    """A tiny OV3 trained 2 steps with TP2, or with PP2 and a learned 4x4 position table (resized to 32px's 2x2
    grid), through the DeepSpeed launcher (tests/layouts.py EXPORT_SOURCES)."""
    return str(layout_runs.folder / f"export-{request.param}")


def _convert(*args):
    return run_inprocess("tools/convert_to_hf.py", "--no-progress", *args, env={"HF_HUB_OFFLINE": "1"})


def _reference(ckpt_dir):
    """megatron_ov3's own outputs for the checkpoint (single process, universal copy)."""
    from megatron_ov3 import parallel
    from megatron_ov3.checkpointing import resolve_universal
    from megatron_ov3.export.convert import load_source
    from megatron_ov3.models import FrozenVAE, OV3Config, build_model
    from megatron_ov3.checkpointing.universal import load_universal

    parallel.initialize_model_parallel(1, 1)
    cfg, _, _ = load_source(ckpt_dir, progress=False)
    model = build_model(OV3Config.from_dict(cfg), vae=FrozenVAE.tiny())
    load_universal(model, resolve_universal(ckpt_dir), load_optimizer=False)
    model.eval()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    ids = torch.randint(4, 500, (2, 80), generator=g)
    ids[:, 40:] = 0
    with torch.no_grad():
        enc = model.encode_image(images, output_hidden_states=True)
        z_hat, x_hat = model.reconstruct(images)
        txt = model.encode_text(ids)
    return model, images, ids, enc, z_hat, x_hat, txt


def _import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    spec.loader.exec_module(mod)
    return mod


def test_hf_llava_rae_parity(ckpt, tmp_path, mp1):
    out = tmp_path / "hf"
    r = _convert("--load", ckpt, "--target", "hf", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "vae/config.json",
              "modeling_ov3.py", "llava_ov3_tower.py", "rae_ov3.py"):
        assert (out / f).exists(), f
    model, images, ids, enc, z_hat, x_hat, txt = _reference(ckpt)

    from transformers import AutoModel, CLIPImageProcessor

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    with torch.no_grad():
        o = hf(pixel_values=images, output_hidden_states=True)
        torch.testing.assert_close(o.last_hidden_state, enc.tokens, **TOL)
        torch.testing.assert_close(o.pooler_output, enc.pooled, **TOL)
        torch.testing.assert_close(o.image_embeds, enc.embedding, **TOL)
        assert len(o.hidden_states) == len(enc.hidden_states)
        for a, b in zip(o.hidden_states, enc.hidden_states):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(hf.get_text_features(ids), txt, **TOL)
        hz, hx = hf.reconstruct(pixel_values=images)
        torch.testing.assert_close(hz, z_hat, **TOL)
        torch.testing.assert_close(hx, x_hat, **TOL)
    proc = CLIPImageProcessor.from_pretrained(str(out))
    assert list(proc.image_mean) == [0.5, 0.5, 0.5] and dict(proc.crop_size) == {"height": 32, "width": 32}
    # LLaVA/RAE preprocess an image like training did (shorter-side bicubic resize, center crop, [-1, 1])
    import io

    from PIL import Image

    from megatron_ov3.data.pipeline import decode_image

    buf = io.BytesIO()
    Image.fromarray((torch.rand(48, 40, 3) * 255).byte().numpy()).save(buf, format="PNG")
    pv = proc.preprocess([Image.open(io.BytesIO(buf.getvalue()))], return_tensors="pt")["pixel_values"]
    assert pv.shape == (1, 3, 32, 32)
    assert (pv[0] - decode_image(buf.getvalue(), 32)).abs().max() < 2.5 / 255

    # LLaVA-1.5 tower, built as llava/model/multimodal_encoder/builder.py would
    llava = _import_file(str(out / "llava_ov3_tower.py"), "llava_ov3_tower")
    assert llava.is_ov3_tower(str(out))
    args = type("A", (), {"mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"})()
    tower = llava.OV3VisionTower(str(out), args, delay_load=True)
    assert tower.hidden_size == 64 and tower.num_patches_per_side == 2 and tower.num_patches == 4
    tower.load_model()
    feats = tower(images)
    torch.testing.assert_close(feats, enc.hidden_states[-2][:, 1:], **TOL)  # class token dropped
    assert not feats.requires_grad
    per_image = tower([im for im in images])  # a list in, one (1, N, C) per image out, as CLIPVisionTower
    assert [f.shape for f in per_image] == [(1, 4, 64)] * 2
    torch.testing.assert_close(torch.cat(per_image), feats, **TOL)
    # generic code reads image_size // patch_size tokens per side: patch_size is the pixel stride
    assert tower.config.patch_size == 16 and tower.config.latent_patch_size == 2
    assert tower.config.image_size // tower.config.patch_size == tower.num_patches_per_side
    assert tower.dummy_feature.shape == (1, 64) and tower.dtype == torch.float32
    tower.select_feature = "cls_patch"
    torch.testing.assert_close(tower(images), enc.hidden_states[-2], **TOL)

    # RAE stage-1 encoder and the OV3 decoder in RAE's decoder slot
    rae = _import_file(str(out / "rae_ov3.py"), "rae_ov3")
    renc = rae.OV3RAEEncoder(str(out))
    assert renc.patch_size == 16 and renc.hidden_size == 64
    toks = renc(images)
    assert toks.dtype == torch.float32 and toks.shape == (2, 4, 64)
    # the tokens OV3's decoder (and its noise) saw in training: parameter-free LayerNorm (RAE's convention)
    from megatron_ov3.models.decoder import decoder_input

    assert model.cfg.decoder_noise_norm == "layernorm" and hf.config.decoder_noise_norm == "layernorm"
    torch.testing.assert_close(toks, decoder_input(enc.tokens, model.cfg), **TOL)
    dec = rae.OV3RAEDecoder.from_export(str(out))
    with torch.no_grad():
        pix = dec.unpatchify(dec(toks).logits)
    torch.testing.assert_close(pix, x_hat, **TOL)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(out)).model_type == "ov3"  # no trust_remote_code (RAE's call)
    legacy = type(hf.config)(patch_size=2)  # an export from before latent_patch_size: patch_size was the latent's
    assert (legacy.patch_size, legacy.latent_patch_size) == (16, 2)


def _open_clip_visual(sd, cfg, latents):
    """open_clip's VisionTransformer forward (OV3 options) written with torch.nn.MultiheadAttention."""
    vc = cfg["model_cfg"]["vision_cfg"]
    w, heads = vc["width"], vc["width"] // vc["head_width"]
    x = torch.nn.functional.conv2d(latents, sd["visual.conv1.weight"], stride=vc["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, w), x], dim=1) + sd["visual.positional_embedding"]
    for i in range(vc["layers"]):
        p = f"visual.transformer.resblocks.{i}."

        def ln(t, n, p=p):
            return torch.nn.functional.layer_norm(t, (w,), sd[p + n + ".weight"], sd[p + n + ".bias"], 1e-6)

        mha = torch.nn.MultiheadAttention(w, heads, batch_first=True)
        mha.load_state_dict({k: sd[p + "attn." + k] for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                              "out_proj.bias")})
        h = ln(x, "ln_1")
        x = x + mha(h, h, h, need_weights=False)[0]
        h = torch.nn.functional.linear(ln(x, "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = torch.nn.functional.gelu(h)
        x = x + torch.nn.functional.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    tokens = x[:, 1:]
    ln_post = (sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    pooled = torch.nn.functional.layer_norm(tokens.mean(1), (w,), *ln_post,
                                            1e-6)
    return pooled @ sd["visual.proj"], tokens


def test_open_clip_export_and_round_trip(ckpt, tmp_path, mp1):
    out = tmp_path / "oc"
    r = _convert("--load", ckpt, "--target", "open_clip", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = torch.load(out / "open_clip_pytorch_model.bin", weights_only=True)
    cfg = json.load(open(out / "open_clip_config.json"))
    assert all(k.startswith("visual.") for k in sd)
    assert len(sd) == 6 + 12 * 2  # conv1, class, pos, ln_post (2), proj + 12 tensors per block
    assert cfg["model_cfg"]["vision_cfg"]["in_channels"] == 16 and cfg["model_cfg"]["vision_cfg"]["image_size"] == 4
    model, images, _, enc, _, _, _ = _reference(ckpt)
    with torch.no_grad():
        emb, tokens = _open_clip_visual(sd, cfg, model.vae.encode(images))
    torch.testing.assert_close(tokens, enc.tokens, **TOL)
    torch.testing.assert_close(emb, enc.embedding, **TOL)
    # and back into megatron_ov3
    uni = tmp_path / "imported"
    r = _convert("--import-open-clip", out, "--output", uni, "--model-size", "tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    from megatron_ov3.models import FrozenVAE, OV3Config, build_model
    from megatron_ov3.checkpointing.universal import load_universal

    meta = json.load(open(uni / "meta.json"))
    again = build_model(OV3Config.from_dict(meta["model_config"]), vae=FrozenVAE.tiny())
    load_universal(again, str(uni), load_optimizer=False)
    again.eval()
    with torch.no_grad():
        e2 = again.encode_image(images)
    torch.testing.assert_close(e2.tokens, enc.tokens, **TOL)
    torch.testing.assert_close(e2.embedding, enc.embedding, **TOL)


def test_convert_errors(tmp_path):
    r = _convert("--load", tmp_path / "nope", "--output", tmp_path / "o")
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "latest").write_text("iter_0000001")
    r = _convert("--load", tmp_path / "ck", "--output", tmp_path / "o")
    assert r.returncode == 2 and "not a complete checkpoint" in r.stderr
    r = _convert("--load", tmp_path, "--target", "onnx", "--output", tmp_path / "o")
    assert r.returncode == 2 and "unknown --target 'onnx'" in r.stderr
    r = _convert("--import-open-clip", tmp_path, "--output", tmp_path / "o")
    assert r.returncode == 2 and "open_clip_config.json" in r.stderr


def test_init_checkpoint_takes_the_encoder_options_and_exports(tmp_path):
    """An exportable (release-layout) checkpoint without training: init_checkpoint.py takes training's model flags."""
    init = tmp_path / "init"
    r = run_inprocess("tools/init_checkpoint.py", "--image-size", "32", "--class-token", "--position-embedding-type",
                      "learned", "--pos-embed-ref-grid", "2", "--output", init)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.load(open(init / "universal" / "meta.json"))["model_config"]
    assert cfg["class_token"] and cfg["position_embedding_type"] == "learned" and cfg["image_size"] == 32
    r = _convert("--load", init / "universal", "--target", "open_clip", "--output", tmp_path / "oc")
    assert r.returncode == 0, r.stderr[-3000:]
    sd = torch.load(tmp_path / "oc" / "open_clip_pytorch_model.bin", weights_only=True)
    assert sd["visual.positional_embedding"].shape[0] == 1 + 2 * 2  # class row + the 2x2 learned table
