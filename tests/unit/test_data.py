"""Data pipeline on real tar shards: coverage, identical TP batches, exact resume, bad-sample accounting."""
import os
from collections import Counter

import pytest
import torch

from helpers import tar_of
from megatron_ov3.data import DataConfig, DataIterator, REASONS
from megatron_ov3.data.pipeline import noise_seed
from megatron_ov3.data.shards import expand_urls, iter_tar_samples, shard_name
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
    return {noise_seed(seed, shard_name(u), s["__key__"], 0) for u in expand_urls(spec)[0]
            for s in iter_tar_samples(u, print)}


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


def test_evaluation_keeps_partial_batches(data):
    """drop_last=False (evaluation): a micro batch that does not divide a worker's share still covers every
    held-out sample exactly once; training's default drops each worker's remainder."""
    spec, tok = data
    for drop_last, want in ((False, 96), (True, 4 * 4 * 5)):  # 4 (rank, worker) slots of 24 samples; 4 full batches
        seen = Counter()
        for rank in range(2):
            for batch in DataIterator(_cfg(spec, tok, epochs=1, micro_batch_size=5, drop_last=drop_last), rank, 2):
                seen.update(batch["noise_seeds"].tolist())
        assert sum(seen.values()) == want and all(c == 1 for c in seen.values())
    assert set(seen) <= _all_ids(spec)


def test_tensor_parallel_ranks_get_identical_batches(data):
    spec, tok = data
    a, b = DataIterator(_cfg(spec, tok), 1, 2), DataIterator(_cfg(spec, tok), 1, 2)
    for _ in range(5):
        x, y = next(a), next(b)
        for k in x:
            assert torch.equal(x[k], y[k])


def test_the_same_shards_in_another_folder_give_the_same_batches(tmp_path, data):
    """Seeds follow the shard's name, not its folder: a copy of the data trains identically (the demo's numbers
    do not depend on DEMO_DIR)."""
    import shutil

    spec, tok = data
    shutil.copytree(os.path.dirname(spec), tmp_path / "copy")
    moved = str(tmp_path / "copy" / os.path.basename(spec))
    a, b = DataIterator(_cfg(spec, tok), 0, 1), DataIterator(_cfg(moved, tok), 0, 1)
    for _ in range(4):
        x, y = next(a), next(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_shard_name_is_the_file_name_however_reached():
    for url in ("d/x-001.tar", "file:///d/x-001.tar", "https://h/d/x-001.tar?sig=1", "s3://b/d/x-001.tar",
                "pipe:aws s3 cp s3://b/d/x-001.tar -", "pipe:curl -s -L https://h/d/x-001.tar"):
        assert shard_name(url) == "x-001.tar", url


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
    spec = str(tmp_path / "synthetic-{00000..00006}.tar")  # 00005 and 00006 do not exist
    it = DataIterator(_cfg(spec, tok, epochs=1, num_workers=1, micro_batch_size=1), 0, 1)
    n = sum(1 for _ in it)
    bad = it.bad_counts()
    assert n == 48
    assert bad["bad_image"] == 4 and bad["empty_caption"] == 4 and bad["missing_caption"] == 4
    assert bad["bad_shard"] == 3  # the garbage tar and the two missing files
    assert set(bad) == set(REASONS)


def test_no_usable_shard_is_an_error_not_a_hang(tmp_path, data):
    """A mistyped --data-path (no shard exists) fails at once; shards that exist but hold nothing stop an endless
    stream with an error instead of spinning forever."""
    import tarfile

    _, tok = data
    with pytest.raises(FileNotFoundError, match="none of the 2 shards of source 1 exists"):
        next(DataIterator(_cfg(str(tmp_path / "typo-{0..1}.tar"), tok, num_workers=1), 0, 1))
    for i in range(2):
        tarfile.open(tmp_path / f"empty-{i}.tar", "w").close()
    for resample in (False, True):
        it = DataIterator(_cfg(str(tmp_path / "empty-{0..1}.tar"), tok, num_workers=1, resample=resample), 0, 1)
        with pytest.raises(ValueError, match="gave no sample"):
            next(it)


def test_image_modes_decode_to_the_right_pixels():
    """16-bit grey is scaled, not clipped; transparency is composited onto white (as HF processors do)."""
    import io

    import numpy as np
    from PIL import Image

    from megatron_ov3.data.pipeline import collate, decode_image

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert grey16.mode.startswith("I")
    assert decode_image(png(grey16), 8).abs().max() < 0.01  # mid-grey -> ~0 in [-1, 1]
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.allclose(decode_image(png(clear), 8), torch.ones(3, 8, 8))
    half = Image.new("LA", (8, 8), (0, 128))
    assert decode_image(png(half), 8).mean().item() == pytest.approx(127 / 127.5 - 1, abs=0.01)
    opaque = Image.new("RGB", (8, 8), (255, 0, 0))
    x = decode_image(png(opaque), 8)
    assert x[0].min() == 1 and x[1].max() == -1
    # a batch from mixed sources: the samples without a class label get -1
    b = collate([{"x": torch.zeros(2), "labels": torch.tensor(3)}, {"x": torch.ones(2)}])
    assert b["labels"].tolist() == [3, -1] and b["x"].shape == (2, 2)


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


def _members(src, n):
    """(name, bytes) of the first ``n`` samples of synthetic shard ``src``."""
    out = []
    for smp in list(iter_tar_samples(str(src), print))[:n]:
        out += [(f"{smp['__key__']}.{ext}", smp[ext]) for ext in ("jpg", "txt")]
    return out


def _read_all(spec, tok, **kw):
    it = DataIterator(_cfg(spec, tok, epochs=1, num_workers=1, micro_batch_size=1, shuffle_buffer=0, **kw), 0, 1)
    return sum(1 for _ in it), it.bad_counts()


def test_damage_costs_only_what_is_damaged(tmp_path, data):
    """A duplicated member loses nothing else of its shard; a truncated shard counts the samples it lost (from
    sizes.json); a stray latent sample in an image shard is one wrong_kind, not the rest of the worker's images."""
    import numpy as np

    from megatron_ov3.data.shards import ShardWriter, encode_latent

    _, tok = data
    write_synthetic_shards(str(tmp_path / "src"), 40, samples_per_shard=40, image_size=32, seed=3)
    members = _members(tmp_path / "src" / "synthetic-00000.tar", 40)
    dup = tmp_path / "dup"
    dup.mkdir()
    tar_of(dup / "a.tar", members[:20] + [members[19]] + members[20:])  # sample 10's caption twice
    n, bad = _read_all(str(dup / "a.tar"), tok)
    assert n == 40 and bad["duplicate_member"] == 1 and bad["bad_shard"] == 0, bad

    cut = tmp_path / "cut"
    with ShardWriter(str(cut), samples_per_shard=40, prefix="s") as w:  # records sizes.json
        for i in range(0, 80, 2):
            w.write(f"k{i // 2:03d}", {"jpg": members[i][1], "txt": members[i + 1][1]})
    tar = cut / "s-00000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    n, bad = _read_all(str(tar), tok)
    assert bad["bad_shard"] == 1 and 10 < n < 30 and n + bad["lost_sample"] == 40, (n, bad)

    stray = tmp_path / "stray"
    stray.mkdir()
    latent = encode_latent(np.zeros((16, 4, 4), np.float32))
    tar_of(stray / "a.tar", [("z000.latent.npy", latent), ("z000.txt", b"a latent")] + members)
    n, bad = _read_all(str(stray / "a.tar"), tok)
    assert n == 40 and bad["wrong_kind"] == 1, bad


def test_a_decompression_bomb_is_skipped_from_its_header(tmp_path, data):
    """A 121-megapixel PNG (a few KB on disk) is counted as too_large without being decoded; the cap is a flag."""
    import io
    import zlib

    from PIL import Image

    _, tok = data
    write_synthetic_shards(str(tmp_path / "src"), 8, samples_per_shard=8, image_size=32, seed=4)
    members = _members(tmp_path / "src" / "synthetic-00000.tar", 8)
    buf = io.BytesIO()
    Image.new("1", (11000, 11000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    # and a 30000 x 30000 header (900 megapixels), which PIL itself refuses at open (DecompressionBombError)
    huge = bytearray(buf.getvalue())
    huge[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width, height
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")
    bombs = [("bomb.png", buf.getvalue()), ("bomb.txt", b"huge"), ("huge.png", bytes(huge)), ("huge.txt", b"huger")]
    tar_of(tmp_path / "bomb.tar", members[:8] + bombs + members[8:])
    n, bad = _read_all(str(tmp_path / "bomb.tar"), tok)
    assert n == 8 and bad["too_large"] == 2 and bad["bad_image"] == 0, bad
    n, bad = _read_all(str(tmp_path / "bomb.tar"), tok, max_image_pixels=32 * 32 - 1)  # every image over the cap
    assert n == 0 and bad["too_large"] == 10, bad


@pytest.mark.parametrize("kind", ["captions-only", "zero-byte-jpgs"])
def test_a_source_with_nothing_usable_stops_with_one_line_not_a_hang(tmp_path, data, kind):
    """Every sample read and none usable (an endless epoch loop would wait for a batch forever): the stream stops
    after a bounded number of raw samples with one line naming the source and the reasons, also from a loader
    worker process."""
    from megatron_ov3.errors import UsageError

    members = [m for i in range(20) for m in ([(f"{i:04d}.txt", b"a red circle")] +
                                              ([(f"{i:04d}.jpg", b"")] if kind == "zero-byte-jpgs" else []))]
    spec = tar_of(tmp_path / "bad.tar", members)
    for workers in (0, 1):
        it = DataIterator(_cfg(spec, data[1], num_workers=workers, shuffle_buffer=0), 0, 1)
        with pytest.raises(UsageError) as e:
            next(it)
        msg = str(e.value)
        assert "\n" not in msg and "all unusable" in msg and "bad.tar" in msg, msg
        assert ("missing_image" if kind == "captions-only" else "bad_image") in msg, msg


def test_a_json_that_is_not_an_object_is_counted_not_fatal(tmp_path, data):
    """A KEY.json holding a list (and no .txt) is a caption-less sample: counted, the stream goes on."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "JPEG")
    members = []
    for i in range(8):
        members.append((f"{i:04d}.jpg", buf.getvalue()))
        members.append((f"{i:04d}.json", b'["a", "list"]' if i % 2 else b'{"caption": "a red square"}'))
    spec = tar_of(tmp_path / "json.tar", members)
    it = DataIterator(_cfg(spec, data[1], num_workers=0, micro_batch_size=1, epochs=1, shuffle_buffer=0), 0, 1)
    assert sum(1 for _ in it) == 4 and it.bad_counts()["missing_caption"] == 4
