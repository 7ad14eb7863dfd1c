"""The planner's memory model against DeepSpeed's estimators and against bytes measured on real ZeRO 0-3 engines
(2 gloo processes, fp32); the CLI writes its table, JSON and plots."""
import json
import os

import pytest
import torch

from dist_utils import free_port, run_distributed, run_inprocess
from megatron_ov3.scaling.planner import Hardware, Layout, estimate, model_state_bytes, plan
from megatron_ov3.models import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("params,gpus", [(631_400_960, 8), (1_844_241_664, 64), (3_002_555_201, 512)])
def test_matches_deepspeed_estimators(params, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, ds2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=False)
    ours2 = sum(model_state_bytes(params, gpus, 2, bf16=True).values())
    assert abs(ours2 - ds2) / ds2 < 0.05
    largest = 20_000_000
    _, ds3, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus, cpu_offload=False,
                                                   cpu_offload_params=False)
    ours3 = sum(model_state_bytes(params, gpus, 3, bf16=True, largest_layer=largest).values())
    assert abs(ours3 - ds3) / ds3 < 0.05


def _measure(rank, world, out):
    """Every ZeRO stage in turn on the same 2 processes (one spawn, not four): {stage: bytes per rank}."""
    import deepspeed

    from megatron_ov3 import parallel

    parallel.initialize_model_parallel(1, 1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    found = {zero: _measure_stage(rank, zero) for zero in (0, 1, 2, 3)}
    if rank == 0:
        json.dump(found, open(out, "w"))


def _measure_stage(rank, zero):
    import deepspeed

    from megatron_ov3.models import build_model, get_config
    from megatron_ov3.training.mpu import MegatronMPU

    model = build_model(get_config("tiny", image_size=32))
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, mpu=MegatronMPU(), config={
        "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True})
    g = torch.Generator().manual_seed(rank)
    batch = {"latents": torch.randn(2, 16, 4, 4, generator=g), "text_ids": torch.randint(4, 500, (2, 80), generator=g),
             "caption_ids": torch.randint(4, 500, (2, 128), generator=g)}
    model.cfg.pixel_l1_weight = 0.0  # no VAE needed for a memory measurement
    out_ = eng(batch)
    eng.backward(out_["total_loss"])
    eng.step()
    local = lambda p: p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()  # noqa: E731
    params = sum(local(p) for p in eng.module.parameters()) * 4
    torch_opt = eng.optimizer if isinstance(eng.optimizer, torch.optim.Optimizer) else eng.optimizer.optimizer
    optim = 0
    for st in torch_opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            optim += st[k].numel() * 4
    masters = getattr(eng.optimizer, "single_partition_of_fp32_groups", None) or \
        getattr(eng.optimizer, "fp32_partitioned_groups_flat", None) or []
    optim += sum(m.numel() for m in masters) * 4
    return {"n": n, "params": params, "optimizer": optim}


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero_bytes") / "m.json"
    run_distributed(_measure, 2, free_port(), str(out), timeout=400)
    return {int(k): v for k, v in json.load(open(out)).items()}


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_matches_measured_bytes_per_rank(zero, measured):
    m = measured[zero]
    pred = model_state_bytes(m["n"], 2, zero, bf16=False)
    for k in ("params", "optimizer"):
        assert abs(pred[k] - m[k]) / m[k] < 0.05, (zero, k, pred[k], m[k])


def test_plan_ranks_fitting_layouts():
    rows = plan("H", [1, 64], Hardware(), global_batch=4096, top=2)
    for r in rows:
        assert r["fitting"] > 0 and len(r["best"]) == 2
    # the README's recommended layouts (a regression pin: the memory/time model changed if this moves)
    assert rows[0]["best"][0]["layout"] == {"tp": 1, "pp": 1, "dp": 8, "zero": 3, "micro_batch": 64,
                                            "recompute": "selective", "grad_accum": 8}
    assert rows[1]["best"][0]["layout"]["micro_batch"] == 8 and rows[1]["best"][0]["layout"]["dp"] == 512
    assert rows[1]["best"][0]["samples_per_s"] > rows[0]["best"][0]["samples_per_s"]
    cfg = get_config("H")
    lay = Layout(tp=1, pp=1, dp=8, zero=0, micro_batch=64, recompute="none", grad_accum=8)
    assert not estimate(cfg, 256, 4096, 8, lay, Hardware()).fits  # 20 bytes/param + activations > 72 GB


def test_vae_time_follows_the_pixel_loss_fraction():
    from megatron_ov3.scaling.planner import _vae_flops_per_image
    from megatron_ov3.models.accounting import flux_vae_flops

    enc, dec = flux_vae_flops(256)  # counted on the FLUX.1 architecture (meta device); known: 0.273 / 0.622 TFLOP
    assert abs(enc - 0.273e12) < 0.002e12 and abs(dec - 0.622e12) < 0.002e12, (enc, dec)
    assert abs(_vae_flops_per_image(256) - (0.273 + 2 * 0.622) * 1e12) < 0.01e12
    # the step time's VAE part follows: (encode + a quarter of the decode-with-grad) / (encode + all of it)
    cfg = get_config("H")
    lay = Layout(tp=1, pp=1, dp=8, zero=1, micro_batch=32, recompute="none", grad_accum=16)
    full = estimate(cfg, 256, 4096, 8, lay, Hardware()).step_time["vae"]
    quarter = estimate(cfg.replace(pixel_loss_fraction=0.25), 256, 4096, 8, lay, Hardware()).step_time["vae"]
    assert abs(quarter / full - (0.273 + 0.311) / (0.273 + 1.244)) < 0.01


def test_cli_outputs_and_bad_profile(tmp_path):
    r = run_inprocess("tools/scaling_study.py", "--model-size", "B", "--nodes", "1", "4", "--output", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| 4 | 32 | 4096 |" in r.stdout
    assert (tmp_path / "o" / "throughput.png").exists() and (tmp_path / "o" / "memory.png").exists()
    assert json.load(open(tmp_path / "o" / "plan.json"))["plans"]["B"][0]["nodes"] == 1
    (tmp_path / "hw.yaml").write_text("peak_tflops_bf16: 500\nwarp_speed: 9\n")
    r = run_inprocess("tools/scaling_study.py", "--hardware", tmp_path / "hw.yaml")
    assert r.returncode == 2 and "unknown keys ['warp_speed']" in r.stderr
