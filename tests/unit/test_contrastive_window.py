"""The contrastive loss over the whole global batch under gradient accumulation (issue 29): micro 4 x accumulation 2
gives the loss and every gradient of micro 8 x accumulation 1 (fp32, one process; tests/distributed/
test_contrastive.py does it over two data-parallel ranks), with one or two contrastive texts."""
import pytest
import torch

from helpers import split, tiny_model, window_batch, window_step


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("two_texts", [False, True], ids=["alt", "alt+recap"])
def test_accumulated_window_equals_one_pass(mp1, two_texts):
    batch = window_batch(two_texts)
    # the caption loss is a mean over each micro-batch's tokens (as in any accumulation), so it is left out here
    model = tiny_model(image_size=32, caption_weight=0.0)
    model.train()
    (ref,) = window_step(model, [batch])
    ref_grads = _grads(model)
    model.zero_grad()
    losses = window_step(model, split(batch, 2))
    got = _grads(model)
    assert ref_grads.keys() == got.keys() and "logit_scale" in got
    for loss in losses:  # every micro-batch's loss is the window's
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_without_the_pool_each_micro_batch_sees_only_its_own(mp1):
    """The switch is real: per micro-batch the loss (4 candidates) is lower than over the window (8)."""
    model = tiny_model(image_size=32, caption_weight=0.0)
    model.train()
    (ref,) = window_step(model, [window_batch()])
    model.zero_grad()
    own = window_step(model, split(window_batch(), 2), pooled=False)
    assert all(float(x) < float(ref) - 0.1 for x in own), (own, ref)


def test_caption_prefix_alt_conditions_on_the_text_tower(mp1):
    """--caption-prefix alt: the caption loss reaches the text tower (through the alt-text's tokens) and the
    FLOP/parameter accounting counts the prefix's projection."""
    from megatron_ov3.models.accounting import count_parameters

    model = tiny_model(image_size=32, caption_prefix="alt", contrastive_weight=0.0, reconstruction_weight=0.0)
    model.train()
    out = model(window_batch())
    out["caption_loss"].backward()
    text_grad = sum(float(p.grad.abs().sum()) for p in model.text.block.parameters() if p.grad is not None)
    assert text_grad > 0
    counts = count_parameters(model.cfg)
    assert counts["caption"] == sum(p.numel() for p in model.caption.parameters())
    plain = tiny_model(image_size=32)
    assert sum(p.numel() for p in plain.caption.parameters()) < counts["caption"]
