"""The captions of a data set, streamed for the stages that encode text with frozen models.

Reading them touches only each sample's `txt` and `json` (tar members read at their offsets from
the headers, or a manifest's lines): no image is opened, let alone decoded. Captions are
validated as training samples are (bad JSON, non-UTF-8 or empty captions are skipped and
counted); a sample whose image turns out corrupt is skipped later, when training decodes it, and
its caption rows are then simply never looked up.

Nothing here holds the texts: `read_captions` makes one pass to count (samples, the most
captions a sample has, skips), and every column (`caption_column`, `long_column`, `variant`) is
a callable that reads the text members again, at their offsets, each time it is iterated, as
the feature cache wants its rows (`vla.cache.cached_features` reads them once to form its key
and once more to encode a miss). Memory therefore stays flat in the number of captions; the
cache's key index finds duplicate sample keys, naming both shards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (sample key, text, origin: the shard or manifest it came from), a feature-cache row
Row = tuple[str, str, str]
Rows = Callable[[], Iterator[Row]]
WINDOW = 4096   # texts held at a time by `text_windows`


@dataclass(frozen=True)
class Captions:
    """A data set's captions as re-readable streams; it holds counts only (see the module docstring)."""

    source: Any                      # vla.data.stream.DataSource
    count: int                       # samples with valid text
    max_captions: int                # the most short captions one sample has
    long_count: int                  # samples with a long caption

    def records(self) -> Iterator[tuple[str, str, list[str], str | None]]:
        """(origin, key, captions, long caption) of every sample with valid text, in data order,
        read again from the data (skips were counted by `read_captions`)."""
        from vla.data.skips import SkipCounter

        for origin, (key, caps, long_caption) in _caption_records(self.source, SkipCounter()):
            yield origin, key, caps, long_caption

    def _rows(self, pick: Callable[[list[str], str | None], str | None]) -> Rows:
        def rows() -> Iterator[Row]:
            for origin, key, caps, long_caption in self.records():
                text = pick(caps, long_caption)
                if text is not None:
                    yield key, text, origin
        return rows

    @property
    def short(self) -> Rows:
        """Each sample's first caption (img2dataset's `key.txt`): the "caption" column."""
        return self._rows(lambda c, _: c[0])

    def variant(self, name: str) -> tuple[str, Rows]:
        """(cache column, rows: one per sample) of a second text variant: "caption" (the second
        caption, else the first) or "long_caption" (the long caption, else the first caption)."""
        if name == "caption":
            return "caption2", self._rows(lambda c, _: c[1] if len(c) > 1 else c[0])
        if name == "long_caption":
            return "long_caption", self._rows(lambda c, lc: lc or c[0])
        raise ValueError(f"unknown caption variant {name!r}")

    def caption_column(self, i: int) -> tuple[str, Rows]:
        """(cache column, rows) of every sample's caption i, for the samples that have one.
        Column names match `variant`'s: caption i=0 is "caption", i=1 "caption2", ..."""
        return ("caption" if i == 0 else f"caption{i + 1}"), self._rows(lambda c, _: c[i] if len(c) > i else None)

    def long_column(self) -> Rows:
        """Rows of the samples that have a long caption."""
        return self._rows(lambda _, lc: lc or None)


def text_windows(rows: Rows, size: int = WINDOW) -> Iterator[list[str]]:
    """The texts of a column, streamed `size` at a time (e.g. to count tokens in batches)."""
    it = (text for _, text, _ in rows())
    while window := list(itertools.islice(it, size)):
        yield window


def read_captions(path: Path, max_skip_fraction: float) -> tuple[Captions, dict]:
    """The data's captions as streams, and skip counts, reading no image (see the module
    docstring); stops when more than `max_skip_fraction` of the samples are bad."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    source = resolve_data(path)
    skips = SkipCounter()
    count = most = with_long = 0
    for _origin, (_key, caps, long_caption) in _caption_records(source, skips):
        count += 1
        most = max(most, len(caps))
        with_long += bool(long_caption)
    skips.check(max_skip_fraction, str(path))
    return Captions(source, count, most, with_long), skips.as_dict()


def _caption_records(source, skips):
    """(origin, (key, captions, long caption)) of every sample with valid text, in file order."""
    import json

    from vla.data.jsonl import line_image as _line_image
    from vla.data.shards import IMAGE_EXTS, scan_shard

    if source.kind == "jsonl":
        for line in _manifest_lines(Path(source.files[0])):
            try:
                meta = json.loads(line.data)
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                skips.seen += 1
                skips.skip("bad_json")
                continue
            key = meta.get("key")
            image = _line_image(line, meta)  # a stat, not a read
            record = _captions_of(str(key) if key is not None else f"{line.lineno:08d}",
                                  image is not None and image.is_file(), None, meta, skips)
            if record is not None:
                yield str(source.files[0]), record
        return
    for shard in source.files:
        records = scan_shard(shard)
        with open(shard, "rb") as f:
            for record in records:
                members = {}
                for ext in ("txt", "json"):
                    if ext in record.members:
                        offset, size = record.members[ext]
                        f.seek(offset)
                        members[ext] = f.read(size)
                has_image = any(e in record.members for e in IMAGE_EXTS)
                out = _captions_of(record.key, has_image, members.get("txt"), members.get("json"), skips)
                if out is not None:
                    yield str(shard), out


def _manifest_lines(path: Path):
    """The manifest's non-blank lines, read one at a time (`read_manifest` reads the whole file)."""
    from vla.data.jsonl import ManifestLine

    with open(path, "rb") as f:
        for lineno, data in enumerate(f, 1):
            data = data.rstrip(b"\r\n")
            if data.strip():
                yield ManifestLine(path, lineno, data)


def _captions_of(key: str, has_image: bool, txt: bytes | None, meta, skips):
    """Validate a sample's text as `vla.data.shards.sample_from_parts` does, image aside."""
    from vla.data.shards import text_fields

    skips.seen += 1
    fields = text_fields(has_image, txt, meta)
    if isinstance(fields, str):  # the skip reason
        skips.skip(fields)
        return None
    captions, long_caption = fields
    return key, captions, long_caption
