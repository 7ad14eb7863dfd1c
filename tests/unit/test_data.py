"""Data pipeline on real tar shards: coverage, identical TP batches, exact resume, bad-sample accounting."""
import os
from collections import Counter

import pytest
import torch

from megatron_ov3.data import DataConfig, DataIterator, REASONS
from megatron_ov3.data.pipeline import noise_seed
from megatron_ov3.data.shards import expand_urls, iter_tar_samples
from megatron_ov3.data.synthetic import write_synthetic_shards
from megatron_ov3.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(str(d), 96, samples_per_shard=12, image_size=32, seed=1)  # 8 shards
    caps = [s["txt"].decode() for u in sorted(os.listdir(d)) if u.endswith(".tar")
            for s in iter_tar_samples(str(d / u), print)]
    tok = train_tokenizer(caps, str(d / "tok"), vocab_size=64)
    return str(d / "synthetic-{00000..00007}.tar"), tok


def _cfg(spec, tok, **kw):
    base = dict(data_path=spec, tokenizer=tok, micro_batch_size=4, image_size=32, num_workers=2,
                shuffle_buffer=16, seed=7)
    base.update(kw)
    return DataConfig(**base)


def _all_ids(spec, seed=7):
    return {noise_seed(seed, u, s["__key__"], 0) for u in expand_urls(spec)[0] for s in iter_tar_samples(u, print)}


def test_one_epoch_two_ranks_two_workers_sees_every_sample_once(data):
    spec, tok = data
    seen = Counter()
    for rank in range(2):
        for batch in DataIterator(_cfg(spec, tok, epochs=1, micro_batch_size=3), rank, 2):
            seen.update(batch["noise_seeds"].tolist())
            assert batch["images"].shape == (3, 3, 32, 32)
            assert batch["text_ids"].shape == (3, 80) and batch["caption_ids"].shape == (3, 128)
            assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert set(seen) == _all_ids(spec)
    assert all(c == 1 for c in seen.values())
    assert sum(seen.values()) == 96


def test_tensor_parallel_ranks_get_identical_batches(data):
    spec, tok = data
    a, b = DataIterator(_cfg(spec, tok), 1, 2), DataIterator(_cfg(spec, tok), 1, 2)
    for _ in range(5):
        x, y = next(a), next(b)
        for k in x:
            assert torch.equal(x[k], y[k])


@pytest.mark.parametrize("consumed", [3, 4])
def test_resume_mid_epoch_reproduces_stream(data, consumed):
    spec, tok = data
    ref = DataIterator(_cfg(spec, tok), 0, 1)
    stream = [next(ref) for _ in range(consumed + 6)]
    first = DataIterator(_cfg(spec, tok), 0, 1)
    for _ in range(consumed):
        next(first)
    state = first.state_dict()
    assert state["consumed_batches"] == consumed
    resumed = DataIterator(_cfg(spec, tok), 0, 1, state=state)
    for want in stream[consumed:]:
        got = next(resumed)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_resume_with_other_worker_count_is_refused(data):
    spec, tok = data
    it = DataIterator(_cfg(spec, tok), 0, 1)
    next(it)
    with pytest.raises(ValueError, match="resume with --num-workers 2"):
        DataIterator(_cfg(spec, tok, num_workers=3), 0, 1, state=it.state_dict())


def test_bad_samples_are_skipped_and_counted(tmp_path, data):
    _, tok = data
    write_synthetic_shards(str(tmp_path), 60, samples_per_shard=15, image_size=32, seed=2, corrupt_every=5)
    (tmp_path / "synthetic-00004.tar").write_bytes(b"this is not a tar file" * 100)
    spec = str(tmp_path / "synthetic-{00000..00004}.tar") + "::" + str(tmp_path / "missing-{0..1}.tar")
    it = DataIterator(_cfg(spec, tok, epochs=1, num_workers=1, micro_batch_size=1, data_weights=[1, 1]), 0, 1)
    n = sum(1 for _ in it)
    bad = it.bad_counts()
    assert n == 48
    assert bad["bad_image"] == 4 and bad["empty_caption"] == 4 and bad["missing_caption"] == 4
    assert bad["bad_shard"] == 3  # the garbage tar and the two missing files
    assert set(bad) == set(REASONS)


def test_too_few_shards_is_a_clear_error(data):
    spec, tok = data
    with pytest.raises(ValueError, match="fewer than data-parallel size 4 x 4 workers"):
        next(DataIterator(_cfg(spec, tok, num_workers=4), 0, 4))


def test_resampled_multi_source_is_deterministic(data):
    spec, tok = data
    two = spec + "::" + spec
    a = DataIterator(_cfg(two, tok, resample=True, data_weights=[3, 1]), 0, 1)
    b = DataIterator(_cfg(two, tok, resample=True, data_weights=[3, 1]), 0, 1)
    for _ in range(4):
        assert torch.equal(next(a)["noise_seeds"], next(b)["noise_seeds"])


def test_latent_shards_are_detected(tmp_path, data, mp1):
    spec, tok = data
    from megatron_ov3.data.latent_cache import cache_latents
    from megatron_ov3.models import FrozenVAE

    stats = cache_latents(spec, str(tmp_path), FrozenVAE.tiny(), 32, batch_size=8, progress=False)
    assert stats["samples"] == 96 and stats["shards_written"] == 8
    again = cache_latents(spec, str(tmp_path), FrozenVAE.tiny(), 32, progress=False)
    assert again == {"shards_skipped_existing": 8}
    lat_spec = str(tmp_path / "synthetic-{00000..00007}.tar")
    batch = next(DataIterator(_cfg(lat_spec, tok), 0, 1))
    assert "images" not in batch and batch["latents"].shape == (4, 16, 4, 4)
    with pytest.raises(ValueError, match="re-run tools/cache_latents.py --image-size 64"):
        next(DataIterator(_cfg(lat_spec, tok, image_size=64, num_workers=0), 0, 1))


def test_tokenizer_ids(data):
    _, tok = data
    t = Tokenizer(tok)
    ids = t.encode("a red circle", 40)
    assert ids[ids != 0][-1] == 3 and ids[-1] == 0
    assert t.decode(ids) == "a red circle"
