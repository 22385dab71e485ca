"""Training data as a deterministic, resumable stream of batches.

`vla.data.source.resolve_data` turns `--data` into a `DataSource` (shards, a manifest, or
webdataset's shard specifications and URLs; re-exported here). Local shards are read by random access into the tar; a
`pipe:` or URL shard is streamed, one shard's members in memory at a time. Every DataLoader
worker walks all of its rank's records (step 2 below), so each worker streams each of the rank's
remote shards: W workers read remote data W times.

`make_loader` turns a source into batches. The design, chosen so that the
batches depend only on (data, seed, epoch, rank, world_size, batch_size), never on the number of
DataLoader workers, and so that a resume is exact:

1. A rank's records. The source's files (shards; a manifest is one file) are dealt to ranks
   whole (file i goes to rank i % world_size) when there are at least as many files as ranks;
   otherwise (tiny data) every rank reads all files and keeps every world_size-th record. A rank
   holds the same records every epoch; an epoch reorders them: the rank's shards are shuffled
   and the records go through a shuffle buffer, both seeded by (seed, epoch, rank). Shuffling
   works on record handles (tar offsets or manifest lines), so it reads no image bytes.
2. Workers. Each of the rank's records is one item, at position `pos` of its epoch; a record that
   fails validation still yields an item (a placeholder carrying only its skip count). The
   records, numbered from the resume point on, form chunks of C consecutive records (C =
   `chunk_size`); worker w of W decodes only chunks w, w+W, w+2W, ... and hands each over as ONE
   object: its items, with their equal-shaped tensors stacked (a sample crossing the process
   boundary on its own costs more than decoding it). Since every worker yields exactly one
   object per chunk it owns, PyTorch's DataLoader, which takes objects from its workers in turn,
   returns the chunks in record order; without workers the same chunks are made in-process, so
   the order is the same by construction, and C does not change any batch.
3. Batches. The main process unpacks the chunks, drops placeholders and cuts the usable
   samples into batches of `batch_size`; a chunk of exactly `batch_size` usable records that
   starts a batch (the default chunk size, whenever no record was skipped) is taken whole, its
   stacked tensors being the batch's; in `repeat` mode epochs follow one another and batches
   run across their boundary. Each batch comes with the skip counts of the records it consumed,
   counted in the first epoch only, so that each record is counted once however many epochs run.
4. Resume. `start_batch=k` means "after the k*batch_size-th usable sample". Where that sample
   lies depends on which records were skipped, so the records before it are validated again
   (decoded, not transformed) to find its (epoch, pos); the rank holds the same records every
   epoch, so once one epoch has been counted whole epochs are stepped over: a resume costs at
   most two epochs of decoding, never `k` batches of it.

Transforms that draw from torch's RNG get a generator state seeded by (seed, epoch, sample key)
(`sample_seed`: a stable hash, not Python's salted `hash()`), so a sample's random draws (its
augmentation, the caption it trains on) in an epoch are the same with any number of ranks or
workers and after a resume, and new every epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data import default_collate

from vla.data.sample import Sample
from vla.data.shards import MAX_IMAGE_PIXELS
from vla.data.skips import SkipCounter, SkipSample
from vla.data.source import DataSource, Record, resolve_data  # noqa: F401 (resolve_data: re-exported)
from vla.errors import StageError, VlaError

class SampleStream(IterableDataset):
    """One rank's records as items (see the module docstring): `transform(sample)` for a valid
    sample, or `{"sample": sample}` without a transform; a placeholder for a skipped one. Every
    item has `"__skips__"` (the `SkipCounter.as_dict()` counts of its record: `used` is 1 for a
    usable sample, 0 for a placeholder) and `"__pos__"` (epoch, position in the epoch).

    `start_index` records of epoch `epoch` are passed over unread (an exact resume point);
    `repeat` walks epoch, epoch+1, ... forever. `shuffle_buffer=0` keeps the files' order.
    With `chunk_size=C > 0` the stream yields packed chunks of C records instead (see
    `_pack_chunk`; `_unpack_chunk` gives their items back).
    """

    def __init__(self, source: DataSource, transform: Callable[[Sample], dict] | None = None, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle_buffer: int = 0,
                 epoch: int = 0, start_index: int = 0, repeat: bool = False,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, chunk_size: int = 0,
                 draft_size: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.source, self.transform = source, transform
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.epoch, self.start_index, self.repeat = shuffle_buffer, epoch, start_index, repeat
        self.max_image_pixels, self.chunk_size = max_image_pixels, chunk_size
        self.draft_size = draft_size

    def rank_records(self, epoch: int) -> Iterator[Record]:
        """This rank's records in epoch `epoch`'s order (handles only: nothing is decoded)."""
        rng = random.Random(hash((self.seed, epoch, self.rank)))
        files = list(self.source.files)
        if len(files) >= self.world_size:
            mine = files[self.rank::self.world_size]
            if self.shuffle_buffer:
                rng.shuffle(mine)
            records: Iterator[Record] = (r for f in mine for r in self.source.records(f))
        else:
            every = (r for f in files for r in self.source.records(f))
            records = itertools.islice(every, self.rank, None, self.world_size)
        return _shuffled(records, self.shuffle_buffer, rng) if self.shuffle_buffer else records

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            # A Ctrl-C reaches the whole process group. The main process answers it by finishing
            # its step and saving a checkpoint, which needs the workers alive until then.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if self.chunk_size:
                yield from map(_pack_chunk, self._chunks(worker, workers, self.chunk_size))
            else:  # single items: chunks of one record, unpacked
                yield from itertools.chain.from_iterable(self._chunks(worker, workers, 1))
        except VlaError as err:
            if info is None:
                raise
            # DataLoader re-raises a worker's exception with the worker traceback in its message;
            # passing ours as an item keeps the one-line message the CLI shows.
            yield {"__error__": err}

    def _chunks(self, worker: int, workers: int, size: int) -> Iterator[list[dict]]:
        """The items of this worker's chunks: records n (counted from the resume point) with
        n // size % workers == worker, `size` consecutive ones at a time (the stream's last
        chunk may be shorter)."""
        chunk: list[dict] = []
        for n, (record, epoch, pos) in enumerate(self._positions()):
            if n // size % workers == worker:
                chunk.append(self._item(record, epoch, pos))
                if len(chunk) == size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def _positions(self) -> Iterator[tuple[Record, int, int]]:
        """(record, epoch, pos) of every record from the resume point on (handles only)."""
        epoch, skip = self.epoch, self.start_index
        while True:
            count = 0
            for pos, record in enumerate(self.rank_records(epoch)):
                count += 1
                if pos >= skip:
                    yield record, epoch, pos
            if not self.repeat:
                return
            if count == 0:
                raise StageError(f"rank {self.rank} of {self.world_size} has no samples in "
                                 f"{self.source.path}; use fewer ranks or more data")
            epoch, skip = epoch + 1, 0

    def _item(self, record: Record, epoch: int, pos: int) -> dict:
        skips = SkipCounter()
        sample = self.source.load(record, skips, max_image_pixels=self.max_image_pixels,
                                  draft_size=self.draft_size)
        if sample is None:
            item = {}
        elif self.transform is None:
            item = {"sample": sample}
        else:
            seed = sample_seed(self.seed, epoch, sample.key)
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only (transforms run on the CPU): torch.manual_seed would also
                # seed every accelerator's generators, which outlive fork_rng and, while CUDA is
                # not initialised, cost a recorded Python traceback (~2 ms) per call.
                torch.default_generator.manual_seed(seed)
                try:
                    item = self.transform(sample)
                except SkipSample as skip:  # the stage cannot use it: counted, like a corrupt one
                    skips.skip(skip.reason, f"key {sample.key}")
                    item = {}
        item["__skips__"] = skips.as_dict()
        item["__pos__"] = (epoch, pos)
        return item


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """The torch generator seed of sample `key`'s transform in `epoch`: a blake2b digest of
    (seed, epoch, key), the same in every process (Python's `hash()` of a string is salted per
    process), and independent of the sample's rank and position."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """webdataset's shuffle buffer: hold `size` items and yield a random one as each arrives."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _pack_chunk(items: list[dict]) -> dict:
    """A chunk as one object for the trip from worker to main process: each tensor that every
    usable item has, with one shape and dtype, is stacked (one shared-memory block instead of one
    per sample) and left as None in the items, which keep everything else."""
    usable = [item for item in items if item["__skips__"]["used"]]
    stacked = {}
    for key, value in (usable[0].items() if usable else ()):
        values = [item.get(key) for item in usable]
        if all(isinstance(v, torch.Tensor) and v.shape == value.shape and v.dtype == value.dtype
               for v in values):
            stacked[key] = torch.stack(values)
            for item in usable:
                item[key] = None  # keeps the key's place, so batches keep their key order
    return {"items": items, "stacked": stacked}


def _unpack_chunk(chunk: dict) -> list[dict]:
    """The items of a packed chunk, each usable one given its rows (views) of the stacked tensors."""
    rows = itertools.count()
    for item in chunk["items"]:
        if item["__skips__"]["used"]:
            row = next(rows)
            for key, values in chunk["stacked"].items():
                item[key] = values[row]
    return chunk["items"]


def collate_with_skips(batch: list[dict], count_epoch: int | None = None) -> tuple[dict | None, dict]:
    """Collate the usable items of `batch` (None when there are none) and sum the skip counts of
    all of them, placeholders included (with `count_epoch`, of those from that epoch only: later
    epochs repeat its records). Values torch cannot stack (PIL images, Samples) stay lists."""
    counts = _counts(batch, count_epoch)
    usable = []
    for item in batch:
        if item["__skips__"]["used"]:
            usable.append({k: v for k, v in item.items() if k not in ("__skips__", "__pos__")})
    if not usable:
        return None, counts.as_dict()
    return {k: _collate([u[k] for u in usable]) for k in usable[0]}, counts.as_dict()


def _counts(items: list[dict], count_epoch: int | None) -> SkipCounter:
    """The summed skip counts of `items`; with `count_epoch`, of those from that epoch only."""
    counts = SkipCounter()
    for item in items:
        if count_epoch is None or item["__pos__"][0] == count_epoch:
            counts.add_counts(item["__skips__"])
    return counts


def _collate(values: list) -> Any:
    try:
        return default_collate(values)
    except TypeError:  # default_collate's answer to a type it cannot batch
        return values


def make_loader(source: DataSource, transform: Callable[[Sample], dict] | None, batch_size: int, *,
                num_workers: int = 0, rank: int = 0, world_size: int = 1, seed: int = 0,
                start_batch: int = 0, repeat: bool = False, drop_last: bool = True,
                shuffle_buffer: int = 0, epoch: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS,
                chunk_size: int | None = None, draft_size: int | None = None) -> Iterator[tuple[dict, dict]]:
    """`(batch, skip_counts)` pairs of this rank: epoch `epoch` (or, with `repeat`, epochs
    `epoch`, `epoch+1`, ... forever) from batch `start_batch` on. The batches do not depend on
    `num_workers`; `start_batch=k` gives exactly what the uninterrupted loader gives from batch k
    on. The skip counts cover the records of epoch `epoch` consumed since the previous batch (a
    tail dropped by `drop_last` is not reported): the later epochs hold the same records again, so
    over a whole run each record is counted once. Raises StageError when a whole epoch has no usable sample.
    `chunk_size`: records a worker hands over at once (default `batch_size`: a chunk with no
    skipped record then is a batch as it is); it changes only speed, never a batch.
    `draft_size`: decode JPEGs at a reduced size of at least this many pixels a side (see
    `shards.sample_from_parts`): for a transform that resizes to that size anyway."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, not {chunk_size}")
    chunk_size = chunk_size or batch_size
    kw = dict(rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
              max_image_pixels=max_image_pixels, chunk_size=chunk_size, draft_size=draft_size)
    return _batches(source, transform, batch_size, num_workers, start_batch, repeat, drop_last, epoch, kw)


def _batches(source, transform, batch_size, num_workers, start_batch, repeat, drop_last, epoch, kw):
    start = _resume_point(source, start_batch * batch_size, epoch, repeat, num_workers, kw,
                          _validator(transform))
    if start is None:
        return
    first_epoch, start_index = start
    stream = SampleStream(source, transform, epoch=first_epoch, start_index=start_index, repeat=repeat, **kw)
    pending, usable, ever_usable = [], 0, False
    for chunk in _chunks(stream, num_workers, batch_size):
        if not pending:
            whole = _chunk_as_batch(chunk, batch_size, epoch)
            if whole is not None:  # the common case: no copy, no per-item collation
                ever_usable = True
                yield whole
                continue
        for item in _unpack_chunk(chunk):
            pending.append(item)
            usable += item["__skips__"]["used"]
            ever_usable = ever_usable or usable > 0
            if not ever_usable and item["__pos__"][0] >= first_epoch + 2:  # epoch first+1 walked whole
                raise _no_usable(source, kw["rank"], collate_with_skips(pending)[1])
            if usable == batch_size:
                yield collate_with_skips(pending, epoch)
                pending, usable = [], 0
    if usable and not drop_last:
        yield collate_with_skips(pending, epoch)


def _chunks(stream: SampleStream, num_workers: int, batch_size: int) -> Iterator[dict]:
    """The packed chunks of `stream`, in record order, from `num_workers` workers (or none)."""
    per_worker = -(-batch_size // (stream.chunk_size * max(num_workers, 1)))  # chunks of a batch
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                        # each worker holds chunks worth about two batches in flight
                        prefetch_factor=max(2, 2 * per_worker) if num_workers else None)
    for chunk in loader:
        if "__error__" in chunk:
            raise chunk["__error__"]
        yield chunk


def _items(stream: SampleStream, num_workers: int, batch_size: int) -> Iterator[dict]:
    """The items of a chunked `stream`, in record order."""
    for chunk in _chunks(stream, num_workers, batch_size):
        yield from _unpack_chunk(chunk)


def _chunk_as_batch(chunk: dict, batch_size: int, count_epoch: int | None = None) -> tuple[dict, dict] | None:
    """A chunk of exactly `batch_size` usable records as the batch `collate_with_skips` would make
    of its items, using the stacked tensors as they are; None for any other chunk."""
    items = chunk["items"]
    if len(items) != batch_size or not all(item["__skips__"]["used"] for item in items):
        return None
    counts = _counts(items, count_epoch)
    batch = {k: chunk["stacked"][k] if k in chunk["stacked"] else _collate([item[k] for item in items])
             for k in items[0] if k not in ("__skips__", "__pos__")}
    return batch, counts.as_dict()


def _no_usable(source: DataSource, rank: int, counts: dict) -> StageError:
    reasons = ", ".join(f"{k}: {v}" for k, v in counts["skipped"].items())
    return StageError(f"no usable sample in a whole epoch of {source.path} (rank {rank}; skipped {reasons}); "
                      f"fix the data")


def _resume_point(source: DataSource, todo: int, epoch: int, repeat: bool, num_workers: int,
                  kw: dict, validate: Callable[[Sample], dict]) -> tuple[int, int] | None:
    """(epoch, records of it to pass over) just after this rank's `todo`-th usable sample from
    the start of `epoch`; None when the stream ends before it (without `repeat`)."""
    if todo == 0:
        return epoch, 0
    pos, counts = _find_usable(source, todo, epoch, num_workers, kw, validate)
    if pos is not None:
        return epoch, pos
    if not repeat:
        return None
    usable = counts.used
    if usable == 0:
        raise _no_usable(source, kw["rank"], counts.as_dict())
    # Every epoch holds the same records, so the same number of usable ones: step over whole
    # epochs, leaving 1..usable samples to find in the last.
    todo -= usable
    whole = (todo - 1) // usable
    epoch += 1 + whole
    pos, _ = _find_usable(source, todo - whole * usable, epoch, num_workers, kw, validate)
    return epoch, pos


def _find_usable(source: DataSource, todo: int, epoch: int, num_workers: int,
                 kw: dict, validate: Callable[[Sample], dict] | None = None) -> tuple[int | None, SkipCounter]:
    """(position just after the `todo`-th usable record of `epoch`, or None; the counts so far)."""
    stream = SampleStream(source, validate or _validate_only, epoch=epoch, **kw)
    counts = SkipCounter()
    for item in _items(stream, num_workers, batch_size=64):
        counts.add_counts(item["__skips__"])
        if counts.used == todo:
            return item["__pos__"][1] + 1, counts
    return None, counts


def _validate_only(sample: Sample) -> dict:
    """The transform of a resume's counting pass: the sample was validated; nothing to keep."""
    return {}


def _validator(transform: Callable[[Sample], dict] | None) -> Callable[[Sample], dict]:
    """The counting pass's transform: the stage transform's own ``validate`` (which raises
    `SkipSample` where the transform would) when it has one, so a resume counts the same samples
    as usable; else `_validate_only`."""
    check = getattr(transform, "validate", None)
    if check is None:
        return _validate_only

    def validate(sample: Sample) -> dict:
        check(sample)
        return {}

    return validate
