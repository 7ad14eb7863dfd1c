"""The paper recipes (examples/configs/ov3_{B,L}_stage{1,2}.yaml over ov3_stage{1,2}.yaml over ov3_paper.yaml) and
the g / bigG scaling recipes resolve without training (--dry-run, exit 0) to the paper's settings: stage 1 at
128px / global 8192 without LPIPS, stage 2 at 256px / global 4096 with LPIPS 0.5 from --finetune-from, ~10:1
samples, a stage-2 learning rate far below stage 1's, and the release-compatible encoder (class token, learned
table, no VAE shift: OV3-B/2's vision tower has exactly the release's 85,893,120 parameters)."""
import json

import pytest

from dist_utils import run_inprocess

ENV = {"DATA_PATH": "d/{0..3}.tar", "VAE_PATH": "/models/flux/vae", "WORLD_SIZE": "64",
       "FINETUNE_FROM": "checkpoints/stage1", "LPIPS_PATH": "/models/lpips_vgg.pth"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_ov3.data.tokenizer import train_tokenizer

    return train_tokenizer(["a red circle", "two blue squares"] * 20, str(tmp_path_factory.mktemp("t") / "tok"),
                           vocab_size=32)


def _resolve(recipe, tokenizer, **env):
    return run_inprocess("-m", "megatron_ov3.pretrain", "--config", f"examples/configs/{recipe}.yaml", "--dry-run",
                         env=dict(TOKENIZER=tokenizer, **{**ENV, **env}))


def _tree(recipe, tokenizer):
    r = _resolve(recipe, tokenizer)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


@pytest.mark.parametrize("size", ["B", "L"])
def test_paper_recipes_resolve_to_the_paper_settings(size, tokenizer):
    from megatron_ov3.models import OV3Config
    from megatron_ov3.models.accounting import count_parameters

    one, two = _tree(f"ov3_{size}_stage1", tokenizer), _tree(f"ov3_{size}_stage2", tokenizer)
    for tree in (one, two):
        m = tree["model"]
        assert m["size"] == size and m["class_token"] and m["position_embedding_type"] == "learned"
        assert tree["vae"]["vae_shift_factor"] == 0.0 and tree["layers"]["bf16"]
        assert tree["checkpoint"]["load"] == tree["checkpoint"]["save"]
        d = tree["data"]  # OpenVision's augmentation and caption routing
        assert d["augment"] and (d["crop_min_area"], d["color_jitter"], d["grayscale_prob"]) == (0.4, 0.4, 0.2)
        assert d["contrastive_texts"] == "alt,recap-sentence" and d["recaption_key"] == "re_caption"
        assert (m["contrastive_texts"], m["caption_prefix"], m["decoder_noise_norm"]) == ("alt,recap-sentence", "alt",
                                                                                          "layernorm")
        assert tree["train"]["contrastive_global_batch"]  # issue 29: OpenVision's one-step contrastive batch
    stage = lambda t: (t["model"]["image_size"], t["train"]["global_batch_size"], t["model"]["lpips_weight"])  # noqa
    assert stage(one) == (128, 8192, 0) and stage(two) == (256, 4096, 0.5)
    assert two["model"]["lpips_path"] == ENV["LPIPS_PATH"]
    assert two["checkpoint"]["finetune_from"] == ENV["FINETUNE_FROM"]
    assert one["train"]["train_samples"] == 10 * two["train"]["train_samples"]
    assert two["optim"]["lr"] * 10 < one["optim"]["lr"] and two["optim"]["lr_warmup_iters"] > 0
    assert one["checkpoint"]["save"] != two["checkpoint"]["save"]
    if size == "B":
        assert count_parameters(OV3Config.from_dict(two["model"]))["encoder"] == 85_893_120  # the release's tower


def test_stage_2_says_what_it_needs(tokenizer, monkeypatch):
    monkeypatch.delenv("FINETUNE_FROM", raising=False)
    r = run_inprocess("-m", "megatron_ov3.pretrain", "--config", "examples/configs/ov3_B_stage2.yaml", "--dry-run",
                      env=dict(TOKENIZER=tokenizer, **{k: v for k, v in ENV.items() if k != "FINETUNE_FROM"}))
    assert r.returncode == 2 and "set FINETUNE_FROM to the stage-1 --save folder" in r.stderr, r.stderr[-1000:]


@pytest.mark.parametrize("size", ["g", "bigG"])
def test_billion_parameter_scaling_recipes(size, tokenizer):
    tree = _tree(f"ov3_{size}", tokenizer)
    assert tree["model"]["size"] == size and tree["layers"]["recompute_granularity"] == "full"
    assert tree["model"]["image_size"] == 256 and tree["train"]["global_batch_size"] == 4096
    assert tree["checkpoint"]["save"] == f"checkpoints/ov3-{size}"


def test_base_files_merge_and_refuse_cycles(tmp_path):
    from megatron_ov3.config.tree import read_file
    from megatron_ov3.errors import UsageError

    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain: {micro_batch_size: 4}\nenv: {X: train.seed}\n")
    (tmp_path / "b.yaml").write_text("train: {micro_batch_size: 2, global_batch_size: 8}\nenv: {Y: optim.lr}\n")
    got = read_file(str(tmp_path / "a.yaml"))
    assert got["train"] == {"micro_batch_size": 4, "global_batch_size": 8} and set(got["env"]) == {"X", "Y"}
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UsageError, match="cycle"):
        read_file(str(tmp_path / "a.yaml"))


def test_paper_recipes_read_the_elastic_data_order_on_their_planned_layout():
    """The recipes' global batch, 100k shards and 8 loader workers on DP 64 (the planner's layout): the default
    number of virtual streams lets every worker read its own (issue 28), so a resume on fewer nodes is exact."""
    from megatron_ov3.data import DataConfig
    from megatron_ov3.data.elastic import auto_streams, why_not_elastic

    cfg = DataConfig(num_workers=8)
    for global_batch in (8192, 4096):
        v = auto_streams(global_batch, 100_000)
        assert why_not_elastic(cfg, v, global_batch, 64, 100_000, 1) is None, v
