"""Contrastive loss over the data-parallel group equals the single-process loss over the concatenated batch."""
import pytest
import torch

from dist_utils import free_port, run_distributed
from helpers import window_batch, window_step

pytestmark = pytest.mark.distributed

B, E, WORLD = 3, 8, 2


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * B, E, generator=g), torch.randn(WORLD * B, E, generator=g)


def _reference():
    from megatron_ov3.losses import contrastive_loss

    img, txt = _data()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss, _, _ = contrastive_loss(img, txt, scale, group=None)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def _worker(rank, world, outdir):
    import torch.distributed as dist

    from megatron_ov3 import parallel
    from megatron_ov3.losses import contrastive_loss

    parallel.initialize_model_parallel(1, 1)
    img, txt = _data()
    img = img[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    txt = txt[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss, _, _ = contrastive_loss(img, txt, scale, group=parallel.data_parallel_group())
    loss.backward()
    # data-parallel gradient averaging, as DeepSpeed/DDP do for parameters
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    sg = scale.grad.clone()
    dist.all_reduce(sg)
    sg /= world
    torch.save({"loss": mean_loss, "img": img.grad / world, "txt": txt.grad / world, "scale": sg},
               f"{outdir}/rank{rank}.pt")
    # the same two processes for every check of this file (a spawn costs more than any of them)
    _window_worker(rank, world, outdir)
    _tp_heads_worker(rank, world, outdir)


def _window_worker(rank, world, outdir):
    """Data-parallel rank ``rank`` of 2: its 4 samples of the 8 as 2 micro-batches of 2, with the pool."""
    import torch.distributed as dist

    from helpers import split
    from megatron_ov3 import parallel

    parallel.initialize_model_parallel(1, 1, seed=0)  # re-made: the same seeds as the reference's
    model = window_model()
    losses = window_step(model, split(split(window_batch(), world)[rank], 2))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    losses = torch.stack(losses)  # this rank's rows against all: the data-parallel mean is the global loss
    for g in list(grads.values()) + [losses]:  # DeepSpeed's data-parallel averaging
        dist.all_reduce(g)
        g /= world
    torch.save({"losses": losses, "grads": grads}, f"{outdir}/window{rank}.pt")


def window_model():
    from helpers import tiny_model

    model = tiny_model(image_size=32, caption_weight=0.0)
    model.train()
    return model


def test_accumulated_window_over_two_ranks_equals_one_pass(ranks_ran, mp1):
    """DP 2 x micro 2 x accumulation 2 == one process x micro 8 x accumulation 1: the contrastive loss (every rank,
    every micro-batch) and every averaged gradient (issue 29)."""
    tmp_path = ranks_ran
    model = window_model()
    (ref,) = window_step(model, [window_batch()])
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for r in range(WORLD):
        got = torch.load(tmp_path / f"window{r}.pt", weights_only=True)
        torch.testing.assert_close(got["losses"], ref.expand(2), atol=1e-6, rtol=0)
        assert got["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def _tp_heads_worker(rank, world, outdir):
    from megatron_ov3 import parallel
    from megatron_ov3.models import ConfigError, TowerConfig, build_model, get_config

    parallel.initialize_model_parallel(2, 1)
    cfg = get_config("tiny", encoder=TowerConfig(63, 1, 126, 3))
    try:
        build_model(cfg)
        said = "built"
    except ConfigError as e:
        said = str(e)
    with open(f"{outdir}/heads{rank}.txt", "w") as f:
        f.write(said)


@pytest.fixture(scope="module")
def ranks_ran(tmp_path_factory):
    """One spawn of 2 gloo processes for both checks of this file: the folder of their results."""
    d = tmp_path_factory.mktemp("contrastive")
    run_distributed(_worker, WORLD, free_port(), str(d), timeout=180)
    return d


def test_contrastive_matches_single_process(ranks_ran):
    tmp_path = ranks_ran
    ref_loss, ref_img, ref_txt, ref_scale = _reference()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], ref_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(got["img"], ref_img[r * B:(r + 1) * B], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["txt"], ref_txt[r * B:(r + 1) * B], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["scale"], ref_scale, atol=1e-6, rtol=0)


def test_tensor_parallel_must_divide_heads(ranks_ran):
    for r in range(WORLD):
        said = (ranks_ran / f"heads{r}.txt").read_text()
        assert "encoder.heads=3 is not divisible by --tensor-model-parallel-size 2" in said, said
