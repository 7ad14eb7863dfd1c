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
