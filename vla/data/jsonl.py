"""JSONL manifests for small data sets: one JSON object per line,

    {"image": "images/0001.jpg", "caption": "a red square"}
    {"image": "/abs/path/0002.png", "captions": ["...", "..."], "long_caption": "...",
     "regions": [{"box": [x0, y0, x1, y1], "label": "...", "caption": "..."}], "label": 3}

A relative `image` resolves against the manifest's directory. Lines are validated like shard
samples (`vla.data.shards.sample_from_parts`); a line that is not a JSON object is `bad_json`, an
image that does not exist is `missing_image`. A sample's key is its `key` field, else its line
number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from vla.data.sample import Sample
from vla.data.shards import sample_from_parts
from vla.data.skips import SkipCounter


class ManifestLine(NamedTuple):
    manifest: Path
    lineno: int  # 1-based, as an editor shows it
    data: bytes


def read_manifest(path: Path) -> list[ManifestLine]:
    """The manifest's non-blank lines (not yet parsed: a bad line is skipped when it is read)."""
    path = Path(path)
    return [ManifestLine(path, i, line) for i, line in enumerate(path.read_bytes().splitlines(), 1)
            if line.strip()]


def _parse(line: ManifestLine) -> dict[str, Any] | None:
    try:
        meta = json.loads(line.data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return None
    return meta if isinstance(meta, dict) else None


def line_image(line: ManifestLine, meta: dict[str, Any] | None = None) -> Path | None:
    """The image file a line names (relative to the manifest's directory), or None."""
    ref = (meta if meta is not None else _parse(line) or {}).get("image")
    if not isinstance(ref, str):
        return None
    return Path(ref) if Path(ref).is_absolute() else line.manifest.parent / ref


def sample_from_line(line: ManifestLine, skips: SkipCounter, **kw: Any) -> Sample | None:
    where = f"{line.manifest.name} line {line.lineno}"
    meta = _parse(line)
    if meta is None:
        skips.seen += 1
        skips.skip("bad_json", where)
        return None
    path = line_image(line, meta)
    image = path.read_bytes() if path is not None and path.is_file() else None
    meta.pop("image", None)
    key = meta.get("key")
    return sample_from_parts(str(key) if key is not None else f"{line.lineno:08d}", image, None, meta,
                             skips, where=where, **kw)


def iter_jsonl_samples(path: Path, skips: SkipCounter, **kw: Any) -> Iterator[Sample]:
    """The valid samples of a manifest, in order; corrupt ones are counted in `skips`."""
    for line in read_manifest(path):
        sample = sample_from_line(line, skips, **kw)
        if sample is not None:
            yield sample
