"""The RAE hand-off: the files an export carries (rae/decoder.pt, rae/rae_stage1.yaml with the values that follow
from the export), RAE's decoder-slot construction (GeneralDecoder(config, num_patches) from the export's config,
RAE's overrides applied, then its strict=False load of the decoder file) reproducing OV3's reconstruction, the
config merge and the checkout patch; with an RAE checkout (RAE_SRC=path), RAE's own stage1.RAE built from the
config the export writes."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from dist_utils import run_inprocess, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*cmd, env=None, cwd=ROOT):
    """Our tools in-process; RAE's own code (another PYTHONPATH) in a child process."""
    if env is None and str(cmd[0]).startswith("tools/"):
        r = run_inprocess(*cmd)
        return r.returncode, r.stdout, r.stderr
    r = subprocess.run([sys.executable, *map(str, cmd)], cwd=cwd, env=env or subprocess_env(ROOT),
                       capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    d = tmp_path_factory.mktemp("rae_export")
    for cmd in (("tools/init_checkpoint.py", "--image-size", 64, "--tiny-vae", "--output", d / "init"),
                ("tools/convert_to_hf.py", "--load", d / "init" / "universal", "--target", "rae", "--output",
                 d / "hf", "--no-progress")):
        rc, _, err = _run(*cmd)
        assert rc == 0, err[-3000:]
    return d / "hf"


def test_export_writes_the_rae_values(export):
    s = yaml.safe_load(open(export / "rae" / "rae_stage1.yaml"))
    p = s["stage_1"]["params"]
    assert s["stage_1"]["target"] == "stage1.RAE" and p["encoder_cls"] == "OV3RAEEncoder"
    assert p["encoder_config_path"] == p["decoder_config_path"] == p["encoder_params"]["path"] == str(export)
    assert (p["encoder_input_size"], p["decoder_patch_size"], p["noise_tau"]) == (64, 16, 0.0)
    assert p["pretrained_decoder_path"] == str(export / "rae" / "decoder.pt")
    assert p["normalization_stat_path"] == str(export / "rae" / "stat.pt")
    width = json.load(open(export / "config.json"))["encoder"]["width"]
    assert s["stage_2"]["params"] == {"input_size": 4, "patch_size": 1, "in_channels": width}  # 64px / 16 = 4
    assert s["misc"] == {"latent_size": [width, 4, 4], "time_dist_shift_dim": 16 * width}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rae_decoder_slot_as_rae_builds_it(export):
    """rae.py's steps: AutoConfig of decoder_config_path, hidden_size/patch_size/image_size overridden,
    GeneralDecoder(config, num_patches), load_state_dict(torch.load(pretrained_decoder_path), strict=False)."""
    from transformers import AutoConfig

    rae = _load("rae_ov3", export / "rae_ov3.py")
    enc = rae.OV3RAEEncoder(str(export))
    p = yaml.safe_load(open(export / "rae" / "rae_stage1.yaml"))["stage_1"]["params"]
    base = (p["encoder_input_size"] // enc.patch_size) ** 2
    cfg = AutoConfig.from_pretrained(p["decoder_config_path"])
    cfg.hidden_size = enc.hidden_size
    cfg.patch_size = p["decoder_patch_size"]
    cfg.image_size = int(p["decoder_patch_size"] * math.sqrt(base))
    dec = rae.GeneralDecoder(cfg, num_patches=base)
    keys = dec.load_state_dict(torch.load(p["pretrained_decoder_path"], map_location="cpu"), strict=False)
    assert not keys.missing_keys and not keys.unexpected_keys
    assert not any(k.startswith("vae") for k in dec.state_dict())  # the frozen VAE is not in RAE's state dict
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # RAE's [0, 1] images
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        z = enc((x - mean) / mean)  # RAE normalises with the export's image processor
        rec = dec.unpatchify(dec(z, drop_cls_token=False).logits) * mean + mean
        _, want = enc.model.reconstruct(pixel_values=(x - mean) / mean)
    torch.testing.assert_close(rec, want * 0.5 + 0.5, rtol=1e-4, atol=1e-4)


def test_config_merge_and_patch(export, tmp_path):
    base = {"stage_1": {"target": "stage1.RAE", "params": {"encoder_cls": "Dinov2withNorm"}},
            "stage_2": {"target": "stage2.models.DDT.DiTwDDTHead",
                        "params": {"input_size": 16, "in_channels": 768, "hidden_size": [1152, 2048]}},
            "misc": {"latent_size": [768, 16, 16], "num_classes": 1000}, "training": {"epochs": 1400}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    rc, _, err = _run("tools/rae_handoff.py", "config", "--export", export, "--base", tmp_path / "base.yaml",
                      "--output", tmp_path / "ov3.yaml")
    assert rc == 2 and "run tools/rae_stats.py" in err
    rc, out, err = _run("tools/rae_handoff.py", "config", "--export", export, "--base", tmp_path / "base.yaml",
                        "--output", tmp_path / "ov3.yaml", "--allow-missing-stats")
    assert rc == 0, err
    got = yaml.safe_load(open(tmp_path / "ov3.yaml"))
    assert got["stage_1"]["params"]["encoder_cls"] == "OV3RAEEncoder" and got["training"] == {"epochs": 1400}
    assert got["stage_2"]["params"]["hidden_size"] == [1152, 2048]  # the DiT's own settings kept
    assert got["stage_2"]["params"]["input_size"] == 4 and got["misc"]["num_classes"] == 1000
    # an RAE-shaped tree: the adapter files beside src/, one line in stage1/decoders/__init__.py, idempotent
    rae = tmp_path / "RAE"
    (rae / "src" / "stage1" / "decoders").mkdir(parents=True)
    (rae / "src" / "stage1" / "rae.py").write_text("from .decoders import GeneralDecoder\n")
    (rae / "src" / "stage1" / "decoders" / "__init__.py").write_text("from .decoder import GeneralDecoder")
    rc, out, err = _run("tools/rae_handoff.py", "patch", "--rae", rae)
    assert rc == 0 and "registered OV3" in out, err
    assert "already patched" in _run("tools/rae_handoff.py", "patch", "--rae", rae)[1]
    lines = (rae / "src" / "stage1" / "decoders" / "__init__.py").read_text().splitlines()
    assert lines[0] == "from .decoder import GeneralDecoder" and lines[1].startswith("from rae_ov3 import")
    assert (rae / "src" / "rae_ov3.py").exists() and (rae / "src" / "modeling_ov3.py").exists()
    rc, _, err = _run("tools/rae_handoff.py", "patch", "--rae", tmp_path / "nothing")
    assert rc == 2 and "is not an RAE checkout" in err


@pytest.mark.skipif(not os.environ.get("RAE_SRC"), reason="needs a checkout of bytetriper/RAE in RAE_SRC (not on "
                    "PyPI; CI has none)")
def test_rae_builds_its_stage1_from_the_export_config(export, tmp_path):
    rae = tmp_path / "RAE"
    shutil.copytree(os.environ["RAE_SRC"], rae, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    rc, out, err = _run("tools/rae_handoff.py", "patch", "--rae", rae)
    assert rc == 0, err
    torch.save({"mean": torch.zeros(1), "var": torch.ones(1)}, export / "rae" / "stat.pt")
    script = (
        "import json, sys, torch, yaml\n"
        "from stage1 import RAE\n"
        "p = yaml.safe_load(open(sys.argv[1]))['stage_1']['params']\n"
        "rae = RAE(**p).eval()\n"
        "x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))\n"
        "z = rae.encode(x); rec = rae.decode(z)\n"
        "print(json.dumps({'z': list(z.shape), 'rec': list(rec.shape), 'enc': type(rae.encoder).__name__,\n"
        "                  'dec': type(rae.decoder).__name__}))\n"
        "torch.save(rec, sys.argv[2])\n")
    (tmp_path / "run.py").write_text(script)
    env = subprocess_env(ROOT, PYTHONPATH=str(rae / "src"))
    rc, out, err = _run(tmp_path / "run.py", export / "rae" / "rae_stage1.yaml", tmp_path / "rec.pt", env=env,
                        cwd=rae)
    (export / "rae" / "stat.pt").unlink()
    assert rc == 0, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res == {"z": [2, 64, 4, 4], "rec": [2, 3, 64, 64], "enc": "OV3RAEEncoder", "dec": "OV3RAEDecoder"}
    rae_mod = _load("rae_ov3_check", export / "rae_ov3.py")
    enc = rae_mod.OV3RAEEncoder(str(export))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, want = enc.model.reconstruct(pixel_values=x * 2 - 1)
    torch.testing.assert_close(torch.load(tmp_path / "rec.pt"), want * 0.5 + 0.5, rtol=1e-4, atol=1e-4)
