"""Small builders shared by tests: a tiny OV3 with its toy VAE and a synthetic batch."""
import torch

from megatron_ov3.models import FrozenVAE, LayerImplConfig, build_model, get_config


def tiny_model(image_size=64, seed=0, impl=None, **overrides):
    torch.manual_seed(seed)
    cfg = get_config("tiny", image_size=image_size, **overrides)
    return build_model(cfg, impl or LayerImplConfig(), vae=FrozenVAE.tiny(seed=seed))


def random_batch(b=4, image_size=64, vocab=512, seed=0, text_len=80, caption_len=128, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab, (b, text_len), generator=g)
    cap = torch.randint(3, vocab, (b, caption_len), generator=g)
    if pad_from is not None:
        text[:, pad_from:] = 0
        cap[:, pad_from:] = 0
    return {
        "images": torch.rand(b, 3, image_size, image_size, generator=g) * 2 - 1,
        "text_ids": text,
        "caption_ids": cap,
    }


def split(batch, parts):
    """A batch cut into ``parts`` equal micro-batches (every entry along its first dimension)."""
    n = next(iter(batch.values())).shape[0] // parts
    return [{k: v[i * n:(i + 1) * n] for k, v in batch.items()} for i in range(parts)]


def window_batch(two_texts=False):
    """8 samples at 32px with per-sample decoder-noise seeds (the same noise whatever the split), optionally a
    second contrastive text: the batch of the accumulation-window tests."""
    b = random_batch(b=8, image_size=32, pad_from=20)
    b["noise_seeds"] = torch.arange(100, 108)
    if two_texts:
        b["text_ids_2"] = torch.roll(b["text_ids"], 1, dims=1)
    return b


def window_step(model, micro_batches, pooled=True):
    """One step's backward over ``micro_batches`` as the trainer runs it through DeepSpeed (each micro-batch's loss
    divided by their number before its backward), with the contrastive pool unless ``pooled`` is False.
    Returns each micro-batch's contrastive loss; the gradients are left on the parameters."""
    from megatron_ov3.training import step as steps

    a = len(micro_batches)
    slots = [steps.pool_slot(model, b, "cpu") for b in micro_batches] if pooled and a > 1 else None
    pool = steps.make_pool(slots) if slots else None
    losses = []
    for j, b in enumerate(micro_batches):
        out = model(steps.with_pool(b, slots[j], pool, j) if pool is not None else b)
        (out["total_loss"] / a).backward()
        losses.append(out["contrastive_loss"].detach())
    return losses


def tiny_dataset(directory):
    """320 synthetic 32px image-caption samples in 8 tar shards and a 64-token sentencepiece model:
    (data path in brace notation, tokenizer path)."""
    import random

    from megatron_ov3.data.synthetic import synthetic_sample, write_synthetic_shards
    from megatron_ov3.data.tokenizer import train_tokenizer

    write_synthetic_shards(str(directory), 320, samples_per_shard=40, image_size=32, seed=0)
    rng = random.Random(1)
    tok = train_tokenizer([synthetic_sample(rng, 8)[1] for _ in range(300)], str(directory / "tok"), vocab_size=64)
    return str(directory / "synthetic-{00000..00007}.tar"), tok


def tar_of(path, members):
    """A tar shard holding ``members`` ((name, bytes) pairs) as they are, member by member: for damaged or odd
    samples (e.g. repeated members, which ShardWriter never writes)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return str(path)
