"""The training stream: rank x worker split, determinism independent of DataLoader workers,
exact resume from a batch index, and skip counts that reach the main process."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from PIL import Image

from vla.data.sample import Sample
from vla.data.shards import ShardWriter
from vla.data.stream import (SampleStream, _pack_chunk, _unpack_chunk, collate_with_skips, make_loader,
                             resolve_data)
from vla.errors import StageError, UserError


def _write(out_dir, n: int, per_shard: int, bad_every: int = 5):
    """n samples, keys s000..; every `bad_every`-th has an empty caption (a skip)."""
    with ShardWriter(out_dir, maxcount=per_shard, image_format="png") as w:
        for i in range(n):
            if i % bad_every == bad_every - 1:
                w.write_raw(f"s{i:03d}", {"png": _png(i), "txt": b" "})
            else:
                w.write(Sample(f"s{i:03d}", Image.new("RGB", (8, 8), (i, 0, 0)), [f"sample {i}"]))
    return resolve_data(out_dir)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def transform(sample: Sample) -> dict:
    # `noise` draws from torch's RNG, as a random augmentation would
    return {"key": sample.key, "red": torch.tensor(float(sample.image.getpixel((0, 0))[0])),
            "noise": torch.rand(2)}


def _take(loader, n: int | None = None) -> list:
    return list(itertools.islice(loader, n))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x["key"] == y["key"] and torch.equal(x["noise"], y["noise"]) and sx == sy
        for (x, sx), (y, sy) in zip(a, b))


@pytest.mark.parametrize("n,per_shard", [(13, 20), (24, 5)])  # 1 shard: split by index; 5 shards: by shard
def test_two_ranks_by_two_workers_see_every_sample_once_per_epoch(tmp_path, n, per_shard):
    source = _write(tmp_path, n, per_shard)
    keys, seen, skipped = [], 0, 0
    for rank in range(2):
        for batch, counts in make_loader(source, transform, 2, num_workers=2, rank=rank, world_size=2, seed=3,
                                         shuffle_buffer=4, drop_last=False):
            keys += batch["key"]
            assert torch.equal(batch["red"], torch.tensor([float(k[1:]) for k in batch["key"]]))
            seen, skipped = seen + counts["seen"], skipped + sum(counts["skipped"].values())
    good = [f"s{i:03d}" for i in range(n) if i % 5 != 4]
    assert sorted(keys) == good and keys != good  # each exactly once, and shuffled
    assert (seen, skipped) == (n, n - len(good))


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path):
    source = _write(tmp_path, 22, 4)
    kw = dict(rank=1, world_size=2, seed=7, shuffle_buffer=3, repeat=True)
    single = _take(make_loader(source, transform, 3, num_workers=0, **kw), 9)  # 9 batches run over 3 epochs
    double = _take(make_loader(source, transform, 3, num_workers=2, **kw), 9)
    assert _same(single, double)
    noise = torch.cat([b["noise"] for b, _ in single])
    assert len(noise.unique(dim=0)) == len(noise)  # a fresh draw per sample, yet reproducible
    assert sum(c["skipped"].get("empty_caption", 0) for _, c in single) > 0


def test_start_batch_gives_exactly_the_rest_of_the_uninterrupted_run(tmp_path):
    source = _write(tmp_path, 30, 6)
    kw = dict(rank=0, world_size=2, seed=11, shuffle_buffer=4, repeat=True)
    full = _take(make_loader(source, transform, 4, num_workers=0, **kw), 14)  # 12 usable per epoch: 3 batches
    for k in (1, 3, 8):
        assert _same(_take(make_loader(source, transform, 4, num_workers=0, start_batch=k, **kw), 14 - k), full[k:])
    resumed = _take(make_loader(source, transform, 4, num_workers=2, start_batch=5, **kw), 4)
    assert _same(resumed, full[5:9])
    one_epoch = dict(kw, repeat=False)
    assert _same(_take(make_loader(source, transform, 4, start_batch=1, **one_epoch)), full[1:3])
    assert _take(make_loader(source, transform, 4, start_batch=4, **one_epoch)) == []


@pytest.mark.parametrize("workers", [0, 2])
def test_each_record_is_counted_once_however_many_epochs(tmp_path, workers):
    """A repeating stream walks the same records every epoch: its counts must not grow per pass
    (one bad sample was reported as two after two epochs), before or after a resume."""
    source = _write(tmp_path, 20, 5)  # 16 usable, 4 skipped
    kw = dict(seed=2, shuffle_buffer=4, repeat=True, num_workers=workers)
    counts = [c for _, c in _take(make_loader(source, transform, 4, **kw), 12)]  # 48 samples: 3 epochs
    total = {"seen": sum(c["seen"] for c in counts), "skipped": sum(c["skipped"].get("empty_caption", 0) for c in counts)}
    assert total == {"seen": 20, "skipped": 4}
    # from a resume point in the second epoch on, nothing more is counted
    assert all(c["seen"] == 0 for _, c in _take(make_loader(source, transform, 4, start_batch=5, **kw), 7))


@pytest.mark.parametrize("workers", [0, 2])
def test_chunk_size_changes_no_batch(tmp_path, workers):
    # 23 records (divisible by none of the chunk sizes), every 4th skipped: skips fall inside chunks
    # and chunks straddle batch and epoch boundaries
    source = _write(tmp_path, 23, 23, bad_every=4)
    kw = dict(seed=5, shuffle_buffer=5, repeat=True)
    ref = _take(make_loader(source, transform, 4, chunk_size=1, **kw), 12)  # 18 usable per epoch
    for chunk in (3, 4, 7, 32):  # 4 = the batch: chunks without a skip are taken whole
        assert _same(_take(make_loader(source, transform, 4, num_workers=workers, chunk_size=chunk, **kw), 12), ref)
    resumed = make_loader(source, transform, 4, num_workers=workers, chunk_size=3, start_batch=5, **kw)
    assert _same(_take(resumed, 7), ref[5:])
    once = dict(kw, repeat=False, drop_last=False)
    tail = _take(make_loader(source, transform, 4, num_workers=workers, chunk_size=5, **once))
    assert _same(tail, _take(make_loader(source, transform, 4, chunk_size=1, **once)))
    assert [len(b["key"]) for b, _ in tail] == [4, 4, 4, 4, 2]
    assert sum(c["seen"] for _, c in tail) == 23 and sum(c["skipped"].get("empty_caption", 0) for _, c in tail) == 5


def test_a_packed_chunk_unpacks_to_its_items():
    def skips(used):
        return {"seen": 1, "used": used, "skipped": {} if used else {"bad_json": 1}}

    items = [{"x": torch.ones(2), "n": torch.ones(1), "key": "a", "__skips__": skips(1), "__pos__": (0, 0)},
             {"__skips__": skips(0), "__pos__": (0, 1)},
             {"x": torch.zeros(2), "n": torch.ones(3), "key": "b", "__skips__": skips(1), "__pos__": (0, 2)}]
    copies = [dict(item) for item in items]
    packed = _pack_chunk(copies)
    assert list(packed["stacked"]) == ["x"]  # "n" differs in shape, "key" is no tensor
    unpacked = _unpack_chunk(packed)
    assert [list(u) for u in unpacked] == [list(i) for i in items]  # same keys, same order
    assert all(torch.equal(u["x"], i["x"]) and u["key"] == i["key"] for u, i in zip(unpacked[::2], items[::2]))
    assert unpacked[1] == items[1] and _unpack_chunk(_pack_chunk([dict(items[1])])) == [items[1]]


def test_each_epoch_order_is_fixed_by_seed_and_epoch(tmp_path):
    source = _write(tmp_path, 20, 5)

    def keys(epoch: int, seed: int = 0) -> list[str]:
        return [r.key for r in SampleStream(source, seed=seed, shuffle_buffer=6).rank_records(epoch)]

    assert keys(0) == keys(0) and sorted(keys(0)) == sorted(keys(1)) and keys(0) != keys(1) != keys(1, seed=1)
    unshuffled = [item["sample"].key for item in SampleStream(source) if item["__skips__"]["used"]]
    assert unshuffled == [f"s{i:03d}" for i in range(20) if i % 5 != 4]


def test_collate_with_skips_drops_placeholders_and_sums_counts():
    items = [{"x": torch.ones(2), "key": "a", "__skips__": {"seen": 1, "used": 1, "skipped": {}}, "__pos__": (0, 0)},
             {"__skips__": {"seen": 1, "used": 0, "skipped": {"bad_json": 1}}, "__pos__": (0, 1)},
             {"x": torch.zeros(2), "key": "b", "__skips__": {"seen": 1, "used": 1, "skipped": {}}, "__pos__": (0, 2)}]
    batch, counts = collate_with_skips(items)
    assert batch["key"] == ["a", "b"] and torch.equal(batch["x"], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert counts == {"seen": 3, "used": 2, "skipped": {"bad_json": 1}}
    assert collate_with_skips(items[1:2]) == (None, counts | {"seen": 1, "used": 0})


def test_a_truncated_shard_in_a_worker_is_the_same_one_line_user_error(tmp_path):
    source = _write(tmp_path, 8, 4)
    data = source.files[1].read_bytes()
    source.files[1].write_bytes(data[:530])  # cut inside the first member's data
    with pytest.raises(UserError) as err:
        _take(make_loader(source, transform, 2, num_workers=2))
    assert "00001.tar is truncated" in str(err.value) and "\n" not in str(err.value)


def test_data_with_no_usable_sample_fails_instead_of_spinning(tmp_path):
    source = _write(tmp_path, 4, 4, bad_every=1)
    with pytest.raises(StageError, match=r"no usable sample in a whole epoch .* empty_caption: \d+"):
        _take(make_loader(source, transform, 2, repeat=True), 1)
    with pytest.raises(StageError, match="no usable sample"):
        _take(make_loader(source, transform, 2, repeat=True, start_batch=3), 1)
    with pytest.raises(StageError, match="rank 1 of 2 has no samples"):
        _take(make_loader(_write(tmp_path / "one", 1, 1), transform, 1, rank=1, world_size=2, repeat=True), 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_whole_chunk_batches_equal_item_by_item_batches(tmp_path, workers):
    # no skipped record: with the default chunk (= the batch) every batch is one chunk taken whole
    source = _write(tmp_path, 24, 6, bad_every=10**6)
    kw = dict(seed=3, shuffle_buffer=4, repeat=True)
    ref = _take(make_loader(source, transform, 4, chunk_size=1, **kw), 15)  # across epoch boundaries
    whole = _take(make_loader(source, transform, 4, num_workers=workers, **kw), 15)
    assert _same(whole, ref)
    for (a, _), (b, _) in zip(whole, ref):
        assert torch.equal(a["red"], b["red"]) and a.keys() == b.keys()
    assert _same(_take(make_loader(source, transform, 4, num_workers=workers, start_batch=7, **kw), 8), ref[7:])
