"""Universal checkpoints: the copy made from DeepSpeed's files after the fact (from_deepspeed.to_universal) is
bit-identical to the one gathered from the live engine, for ZeRO-0/1/2 in fp32 and bf16; and with ZeRO-0 under
--bf16, where DeepSpeed's unfused optimizer keeps fp32 master copies apart from the bf16 parameters, the save
reads the masters and their Adam moments and a load reaches the masters (otherwise the first step would write
the old masters back over the loaded weights)."""
import os

import pytest
import torch


def _engine(bf16: bool, seed: int, zero: int = 0, freeze_first: bool = False):
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    if bf16:
        m = m.to(torch.bfloat16)
    if freeze_first:  # as --freeze-encoder leaves towers without gradients or optimizer state
        m[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16},
           "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
    engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=cfg)
    return engine


def _step(engine, dtype):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()


@pytest.mark.parametrize("bf16", [True, False])
def test_zero0_universal_round_trip_reaches_fp32_masters(mp1, tmp_path, bf16):
    from megatron_ov3.checkpointing import deepspeed_io, universal

    dtype = torch.bfloat16 if bf16 else torch.float32
    src = _engine(bf16, seed=0)
    for _ in range(3):
        _step(src, dtype)
    universal.save_universal(src, str(tmp_path), {"iteration": 3, "optimizer_step": 3})
    d = os.path.join(str(tmp_path), "universal")
    meta, handles = universal.read_universal(d)
    by_id = deepspeed_io.fp32_masters(src)
    masters = [by_id.get(id(p), p) for p in src.module.parameters()]
    assert all(m.dtype == torch.float32 for m in masters) and ((masters[0] is not next(src.module.parameters()))
                                                                == bf16)
    name = "0.weight"
    assert torch.equal(handles[name].get_tensor(name), masters[0].detach().float())  # not the bf16 rounding
    exp_avg = handles[f"{name}::exp_avg"].get_tensor(f"{name}::exp_avg")
    assert exp_avg.abs().sum() > 0  # the moments were found (they are keyed by the masters)

    dst = _engine(bf16, seed=1)  # different initialisation
    universal.load_universal(dst, d)
    dst_by_id = deepspeed_io.fp32_masters(dst)
    for a, b in zip(src.module.parameters(), dst.module.parameters()):
        assert torch.equal(by_id.get(id(a), a), dst_by_id.get(id(b), b))
    # one more step on both: identical, so nothing of the new engine's initialisation survived the load
    _step(src, dtype)
    _step(dst, dtype)
    for a, b in zip(src.module.parameters(), dst.module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("zero,bf16,frozen", [(0, False, False), (0, True, False), (1, False, False),
                                              (1, True, False), (2, True, False), (1, False, True), (0, True, True)])
def test_copy_from_deepspeed_files_equals_live_gather(mp1, tmp_path, zero, bf16, frozen):
    from safetensors.torch import load_file

    from megatron_ov3.checkpointing import from_deepspeed, universal

    dtype = torch.bfloat16 if bf16 else torch.float32
    engine = _engine(bf16, seed=0, zero=zero, freeze_first=frozen)
    for _ in range(3):
        _step(engine, dtype)
    live = tmp_path / "live"
    universal.save_universal(engine, str(live), {"iteration": 3})
    engine.save_checkpoint(str(tmp_path / "ck"), tag="iter_0000003", save_latest=False)
    universal.write_index(engine, str(tmp_path / "ck" / "iter_0000003"), {"iteration": 3, "zero_stage": zero,
                          "pipeline_stages": 1, "tensor_parallel": 1, "data_parallel": 1})
    out = from_deepspeed.to_universal(str(tmp_path / "ck" / "iter_0000003"), log=lambda *_: None)
    a, b = load_file(str(live / "universal" / "stage0.safetensors")), load_file(os.path.join(out, "stage0.safetensors"))
    # 4 parameters, each with value + 2 moments; a frozen one has its value only
    assert sorted(a) == sorted(b) and len(a) == (3 * 2 + 2 if frozen else 3 * 4)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if frozen:
        fresh = _engine(bf16, seed=1, zero=zero, freeze_first=True)
        universal.load_universal(fresh, out)
        assert torch.equal(fresh.module[0].weight, engine.module[0].weight)  # the frozen weight is restored
    assert universal.read_meta(out)["optimizer_step"] == universal.read_meta(str(live / "universal"))["optimizer_step"]
