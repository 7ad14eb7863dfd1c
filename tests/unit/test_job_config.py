"""The typed job configuration: flags from fields, files merged defaults <- file <- env <- flags, one rule set."""
import dataclasses
import json
import os
import re
import pytest

from dist_utils import run_inprocess
from megatron_ov3.config import SECTIONS, ParallelConfig, build_parser, job_from_dict, parse_job
from megatron_ov3.config.job import DERIVED, TrainConfig
from megatron_ov3.errors import UsageError
from megatron_ov3.options import field_docs, flag_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--mock-data", "--tiny-vae", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3"]


def test_every_flag_comes_from_a_documented_field():
    flags = []
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if flag_of(f):
                assert docs.get(f.name), f"{name}.{f.name} has no docstring (its --help text)"
                flags.append(flag_of(f))
    assert len(flags) == len(set(flags)), "two fields share a flag"
    for megatron in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--micro-batch-size",
                     "--global-batch-size", "--bf16", "--fp8-format", "--save", "--load", "--save-interval",
                     "--train-iters", "--lr", "--min-lr", "--lr-warmup-iters", "--clip-grad", "--seed"):
        assert megatron in flags
    helps = {a.option_strings[0]: a.help for a in build_parser()._actions if a.option_strings}
    assert all(helps[f] and "(default:" in helps[f] for f in flags)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("ext", ["yaml", "toml"])
def test_defaults_file_flags_merge_order(tmp_path, ext):
    text = ("train:\n  micro_batch_size: 4\n  global_batch_size: 8\n  train_iters: 7\noptim:\n  lr: 0.003\n"
            if ext == "yaml" else
            "[train]\nmicro_batch_size = 4\nglobal_batch_size = 8\ntrain_iters = 7\n[optim]\nlr = 0.003\n")
    cfg = _write(tmp_path, f"job.{ext}", text)
    job, _ = parse_job(["--config", cfg, "--mock-data", "--tiny-vae", "--train-iters", "9"], environ={})
    assert job.train.micro_batch_size == 4 and job.train.global_batch_size == 8  # file over defaults
    assert job.train.train_iters == 9  # flag over file
    assert job.optim.lr == 0.003 and job.optim.weight_decay == 0.2  # file, default
    assert job.data.micro_batch_size == 4 and job.data.seed == job.train.seed  # derived once, from their owner


def test_bad_files_are_one_line_usage_errors(tmp_path):
    for text, msg in (("trian:\n  lr: 1\n", "unknown section 'trian'"),
                      ("optim:\n  learning_rate: 1\n", "unknown field(s) ['learning_rate']"),
                      ("optim:\n  lr: fast\n", "lr = 'fast' is not of type float"),
                      ("data:\n  image_size: 64\n", "data.image_size is set from model.image_size"),
                      ("optim: [1, 2\n", "is not valid YAML")):
        with pytest.raises(UsageError, match=re.escape(msg)):
            parse_job(["--config", _write(tmp_path, "bad.yaml", text)] + BASE, environ={})
    with pytest.raises(UsageError, match="does not exist"):
        parse_job(["--config", str(tmp_path / "missing.yaml")] + BASE, environ={})


def test_recipe_env_overrides_interpolation_and_required(tmp_path):
    cfg = _write(tmp_path, "r.yaml", "env:\n  DATA: {field: data.data_path, required: 'set DATA to your shards'}\n"
                                     "  TP: parallel.tensor_model_parallel_size\n  BF: layers.bf16\n"
                                     "checkpoint:\n  save: ck\n  load: ${checkpoint.save}\n"
                                     "logging:\n  tensorboard_dir: ${checkpoint.save}/tb\n")
    with pytest.raises(UsageError, match="DATA: set DATA to your shards"):
        parse_job(["--config", cfg, "--tiny-vae"] + BASE[2:], environ={})
    env = {"DATA": "d/{0..3}.tar", "TP": "2", "BF": "yes"}
    job, _ = parse_job(["--config", cfg, "--tiny-vae", "--save", "other"] + BASE[2:], environ=env)
    assert job.data.data_path == "d/{0..3}.tar" and job.parallel.tensor_model_parallel_size == 2 and job.layers.bf16
    assert job.checkpoint.load == "other" and job.logging.tensorboard_dir == "other/tb"  # the flag, interpolated
    job, _ = parse_job(["--config", cfg, "--tiny-vae", "--tensor-model-parallel-size", "4"] + BASE[2:], environ=env)
    assert job.parallel.tensor_model_parallel_size == 4  # flags beat the environment
    with pytest.raises(UsageError, match="environment variable TP=.two.: tensor_model_parallel_size"):
        parse_job(["--config", cfg, "--tiny-vae"] + BASE[2:], environ=dict(env, TP="two"))


def test_none_clears_an_optional_value_and_booleans_negate(tmp_path):
    cfg = _write(tmp_path, "f.yaml", "layers:\n  fp8_format: hybrid\n  bf16: true\n")
    job, _ = parse_job(["--config", cfg, "--fp8-format", "none", "--no-bf16"] + BASE, environ={})
    assert job.layers.fp8_format is None and job.layers.bf16 is False


def test_saved_tree_round_trips():
    job, _ = parse_job(BASE + ["--model-size", "S", "--image-size", "128", "--class-token", "--zero-stage", "2"],
                       environ={})
    again = job_from_dict(json.loads(json.dumps(job.to_dict())))
    assert again == job
    assert set(job.to_dict()) == set(SECTIONS)
    assert all(k in job.to_dict()[s] for s, k in DERIVED)  # derived values are recorded, resolved


def test_parallel_rules_are_one_function():
    from megatron_ov3.models import get_config

    cfg = get_config("tiny", image_size=32)
    assert ParallelConfig(2, 1, 1).validate(4, cfg) == 2
    for par, world, msg in ((ParallelConfig(2, 1, 1), 3, "not divisible by TP 2 x PP 1"),
                            (ParallelConfig(1, 2, 2), 2, "cannot be combined with pipeline"),
                            (ParallelConfig(1, 2, 0), 2, "--zero-stage 0 cannot be combined"),
                            (ParallelConfig(1, 4, 1), 4, "exceeds the encoder's 2 layers")):
        with pytest.raises(UsageError, match=msg):
            par.validate(world, cfg)
    with pytest.raises(UsageError, match="needs --micro-batch-size|give --micro-batch-size"):
        TrainConfig(train_iters=1).validate()


def test_planner_offers_only_layouts_training_accepts():
    from megatron_ov3.models import get_config
    from megatron_ov3.scaling.planner import layouts

    cfg = get_config("H")
    offered = {(lay.tp, lay.pp, lay.zero) for lay in layouts(cfg, 16, 4096, 8)}
    assert {(1, 1, 0), (1, 1, 3), (2, 2, 1), (1, 16, 1), (4, 2, 1)} <= offered
    for refused in ((1, 2, 0), (1, 2, 2), (1, 2, 3), (2, 8, 0)):  # PP + ZeRO-0 used to be offered
        assert refused not in offered and not ParallelConfig(*refused).is_valid(16, cfg)


def test_deepspeed_config_is_a_function_of_the_tree():
    from megatron_ov3.training.ds_config import deepspeed_config

    job, _ = parse_job(BASE + ["--overlap-grad-reduce", "--zero-stage", "2", "--bf16"], environ={})
    ds = deepspeed_config(job, job.validate(1))
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}
    assert ds["bf16"] == {"enabled": True}
    job, _ = parse_job(BASE + ["--overlap-grad-reduce", "--pipeline-model-parallel-size", "2"], environ={})
    ds = deepspeed_config(job, job.validate(2))
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_micro_batch_size_per_gpu"] == 4  # 1F1B accumulates
    assert ds["zero_optimization"] == {"stage": 1}


def test_model_names_its_no_weight_decay_parameters(mp1):
    from helpers import tiny_model

    from megatron_ov3.training.optim import param_groups

    model = tiny_model(image_size=32, class_token=True, position_embedding_type="learned", pos_embed_ref_grid=2)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"encoder.pos_embed", "encoder.class_token", "logit_scale", "text.token_embedding.weight",
            "caption.token_embedding.weight"} <= exempt
    decayed = {names[id(p)] for p in decay["params"]}
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert {"encoder.patch_embed.weight", "encoder.proj.weight", "caption.lm_head.weight",
            "encoder.block.layers.0.self_attention.linear_qkv.weight", "text.proj.weight"} <= decayed
    assert not any("pos_embed" in n or "embedding" in n for n in decayed)


@pytest.mark.parametrize("recipe,env", [
    ("ov3_tiny", {"DATA_PATH": "d/{0..3}.tar", "WORLD_SIZE": "2"}),
    ("ov3_huge", {"DATA_PATH": "d/{0..3}.tar", "VAE_PATH": "/models/flux/vae", "TP": "2", "MICRO_BATCH": "16",
                  "WORLD_SIZE": "128"}),
])
def test_dry_run_resolves_each_recipe(recipe, env, tmp_path):
    """--dry-run validates every flag and prints the resolved tree as JSON (exit 0), without training."""
    from megatron_ov3.data.tokenizer import train_tokenizer

    tok = train_tokenizer(["a red circle", "two blue squares"] * 20, str(tmp_path / "tok"), vocab_size=32)
    r = run_inprocess("-m", "megatron_ov3.pretrain", "--config", f"examples/configs/{recipe}.yaml", "--dry-run",
                      env=dict(env, TOKENIZER=tok))
    assert r.returncode == 0, r.stderr[-2000:]
    tree = json.loads(r.stdout)
    assert tree["data"]["data_path"] == "d/{0..3}.tar" and tree["data"]["tokenizer"] == tok
    from megatron_ov3.data import Tokenizer

    assert tree["model"]["vocab_size"] == Tokenizer(tok).vocab_size != 512  # the tokenizer's, not the size's
    if recipe == "ov3_huge":
        assert tree["model"]["size"] == "H" and tree["parallel"]["tensor_model_parallel_size"] == 2
        assert tree["train"]["micro_batch_size"] == 16 and tree["train"]["global_batch_size"] == 4096
        assert tree["checkpoint"]["load"] == tree["checkpoint"]["save"] == "checkpoints/ov3-huge"
        assert tree["logging"]["tensorboard_dir"] == "checkpoints/ov3-huge/tensorboard"


def test_only_usage_errors_exit_2(monkeypatch):
    from megatron_ov3 import cli
    from megatron_ov3.cli import run

    monkeypatch.setattr(cli, "_shutdown_distributed", lambda barrier: None)  # keep the session's process group

    def bad_input(argv):
        raise UsageError("--x is wrong; use y\nsecond line")

    def internal(argv):
        raise ValueError("a bug")

    assert run(bad_input, []) == 2
    with pytest.raises(ValueError, match="a bug"):  # an internal error keeps its traceback
        run(internal, [])


def test_mpi_and_slurm_launchers_set_the_rank():
    from megatron_ov3.parallel import adopt_launcher_env

    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "node0"}
    assert adopt_launcher_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert env["MASTER_PORT"] == "29500"
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "MASTER_ADDR": "n1", "RANK": "0"}
    assert adopt_launcher_env(env) == {} and env["RANK"] == "0"  # torchrun/DeepSpeed's own variables win
    with pytest.raises(UsageError, match="started by Slurm .* without MASTER_ADDR"):
        adopt_launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_launcher_hook_turns_recipe_env_into_flags_and_checks_first(tmp_path):
    """What the `deepspeed` launcher process does for a recipe (megatron_ov3_recipes.pth -> prepare_launch)."""
    from megatron_ov3.data.tokenizer import train_tokenizer
    from megatron_ov3.launch import prepare_launch

    tok = train_tokenizer(["a red circle", "two blue squares"] * 20, str(tmp_path / "tok"), vocab_size=32)
    env = {"DATA_PATH": "d/{0..3}.tar", "TOKENIZER": tok, "IMAGE_SIZE": "32", "MICRO_BATCH": "4", "GLOBAL_BATCH": "8"}
    script = os.path.join(ROOT, "examples", "pretrain_ov3_tiny.sh")
    argv = ["deepspeed", "--num_gpus", "2", script, "--train-iters", "3"]
    out = prepare_launch(argv, env)
    assert out[:4] == argv[:4] and out[-2:] == ["--train-iters", "3"]
    assert out[4:6] == ["--data-path", "d/{0..3}.tar"] and "--micro-batch-size" in out
    assert prepare_launch(["deepspeed", "other.py", "--x"], env) == ["deepspeed", "other.py", "--x"]
    with pytest.raises(UsageError, match="3 processes .*not divisible by --micro-batch-size 4 x data-parallel size 3"):
        prepare_launch(["deepspeed", "--num_gpus", "3", script], env)


def test_a_file_where_a_checkpoint_folder_belongs(tmp_path):
    f = tmp_path / "ck.pt"
    f.write_text("x")
    with pytest.raises(UsageError, match="--load .* is a file; give the checkpoint folder"):
        parse_job(BASE + ["--load", str(f)], environ={})[0].validate(1)


def test_a_file_can_give_the_caption_decoder_the_text_towers_full_depth():
    """OpenVision 2's caption decoder has the text tower's depth; the registry's is half (CoCa's split): one
    field in a config file changes it and every other tower value stays the size's."""
    from megatron_ov3.config.job import resolve
    from megatron_ov3.models import get_config

    job = resolve({"model": {"size": "B", "caption": {"depth": 12}}, "data": {"mock_data": True}},
                  tokenizer_vocab=False)
    base = get_config("B")
    assert job.model.caption.depth == job.model.text.depth == 12 and base.caption.depth == 6
    assert (job.model.caption.width, job.model.caption.heads) == (base.caption.width, base.caption.heads)
