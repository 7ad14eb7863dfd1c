"""Former tracebacks are one line and exit 2: a --vae-path that is not a diffusers AutoencoderKL folder (every
tool that takes one), a malformed --hardware YAML, a checkpoint of another model size than the flags."""
import json

import pytest

from conftest import TINY_TRAIN
from dist_utils import one_error, run_inprocess, run_python


@pytest.fixture(scope="module")
def not_vaes(tmp_path_factory):
    """Four folders that are not a usable AutoencoderKL: no config, another class, no weights, torn weights."""
    from megatron_ov3.models import FrozenVAE

    root = tmp_path_factory.mktemp("vaes")
    (root / "empty").mkdir()
    (root / "unet").mkdir()
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    FrozenVAE.tiny().save_pretrained(str(root / "torn"))
    weights = root / "torn" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "noweights").mkdir()
    (root / "noweights" / "config.json").write_text((root / "torn" / "config.json").read_text())
    return root


TOOLS = {
    "pretrain": lambda v, _: ["-m", "megatron_ov3.pretrain", "--mock-data", "--image-size", "32", "--micro-batch-size",
                              "2", "--global-batch-size", "2", "--train-iters", "1", "--vae-path", v],
    "cache_latents": lambda v, _: ["tools/cache_latents.py", "--data-path", "x.tar", "--output-dir", v.parent / "o",
                                   "--image-size", "32", "--vae-path", v],
    "benchmark": lambda v, _: ["tools/benchmark.py", "--vae-path", v],
    "convert": lambda v, init: ["tools/convert_to_hf.py", "--load", init, "--output", v.parent / "hf", "--vae-path", v],
}


WORDS = {"empty": "no config.json", "unet": "not an AutoencoderKL",
         "noweights": "no diffusion_pytorch_model.safetensors", "torn": "could not be loaded"}


@pytest.mark.parametrize("kind", list(WORDS))
def test_every_kind_of_non_vae_is_a_usage_error(kind, not_vaes):
    from megatron_ov3.errors import UsageError
    from megatron_ov3.models import FrozenVAE

    with pytest.raises(UsageError, match=WORDS[kind]) as e:
        FrozenVAE.from_pretrained(str(not_vaes / kind))
    assert "--vae-path" in str(e.value) and "\n" not in str(e.value)


# each tool that takes --vae-path, end to end (they share FrozenVAE.from_pretrained, tested above for every kind)
@pytest.mark.parametrize("tool,kind", [("pretrain", "torn"), ("cache_latents", "unet"), ("benchmark", "noweights"),
                                       ("convert", "unet")])
def test_a_folder_that_is_not_a_vae_is_one_line(tool, kind, not_vaes, universal_init):
    run = run_python if tool == "pretrain" else run_inprocess  # pretrain's through the real command line
    err = one_error(run(*TOOLS[tool](not_vaes / kind, universal_init)))
    assert "--vae-path" in err and WORDS[kind] in err and kind in err, err


@pytest.mark.parametrize("text,words", [("peak_tflops_bf16: [1\n", "not valid YAML"), ("- 1\n- 2\n", "not a mapping"),
                                        ("ib_gbps: fast\n", "ib_gbps must be a number"), ("nope: 1\n", "unknown keys")])
def test_a_malformed_hardware_file_is_one_line(tmp_path, text, words):
    (tmp_path / "hw.yaml").write_text(text)
    err = one_error(run_inprocess("tools/scaling_study.py", "--hardware", tmp_path / "hw.yaml"))
    assert words in err, err


def test_a_checkpoint_of_another_size_names_both(trained_ckpt):
    for flag in ("--load", "--finetune-from"):
        err = one_error(run_inprocess(*TINY_TRAIN, "--train-iters", 3, flag, trained_ckpt, "--model-size", "Ti"))
        assert "OV3-tiny" in err and "OV3-Ti" in err and "--model-size" in err and flag in err, err


def test_readers_name_what_is_wrong_with_load_and_classnames(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    convert = ["tools/convert_to_hf.py", "--output", tmp_path / "hf", "--load"]
    assert "holds no checkpoint" in one_error(run_inprocess(*convert, tmp_path / "empty"))
    assert "is a file" in one_error(run_inprocess(*convert, tmp_path / "file"))
    assert "does not exist" in one_error(run_inprocess(*convert, tmp_path / "missing"))
    err = one_error(run_inprocess("tools/evaluate.py", "--load", tmp_path / "empty", "--data-path", "x.tar",
                                  "--tokenizer", "t.model", "--output", tmp_path / "ev", "--classnames",
                                  tmp_path / "names.txt"))
    assert "--classnames" in err and "names.txt" in err, err
    assert not (tmp_path / "ev").exists()
