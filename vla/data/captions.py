"""The captions of a data set as one table, for the stages that encode text with frozen models.

Reading them touches only each sample's `txt` and `json` (tar members read at their offsets from
the headers, or a manifest's lines): no image is opened, let alone decoded. Captions are
validated as training samples are (bad JSON, non-UTF-8 or empty captions are skipped and
counted); a sample whose image turns out corrupt is skipped later, when training decodes it, and
its caption rows are then simply never looked up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class CaptionTable:
    keys: list[str]
    captions: list[list[str]]        # every short caption of each sample, in its order
    long: list[str | None]           # each sample's long caption, if it has one
    origins: list[str] = field(default_factory=list)  # the shard (or manifest) each sample came from

    def rows(self, texts: list[str], keys: list[str] | None = None):
        """(key, text, origin) rows for the feature cache: `texts` with their `keys` (default: every
        sample's key, in order). The origin names the shard in a duplicate-key error."""
        keys = self.keys if keys is None else keys
        origin = dict(zip(self.keys, self.origins)) if keys is not self.keys else None
        for i, (k, t) in enumerate(zip(keys, texts)):
            yield k, t, (self.origins[i] if origin is None else origin.get(k, "")) if self.origins else ""

    @property
    def short(self) -> list[str]:
        """Each sample's first caption (img2dataset's `key.txt`)."""
        return [c[0] for c in self.captions]

    def variant(self, name: str) -> tuple[str, list[str]]:
        """(cache column, text per sample) of a second text variant: "caption" (the second
        caption, else the first) or "long_caption" (the long caption, else the first caption)."""
        if name == "caption":
            return "caption2", [c[1] if len(c) > 1 else c[0] for c in self.captions]
        if name == "long_caption":
            return "long_caption", [lc or c[0] for lc, c in zip(self.long, self.captions)]
        raise ValueError(f"unknown caption variant {name!r}")

    def caption_column(self, i: int) -> tuple[str, list[str], list[str]]:
        """(cache column, keys, texts) of every sample's caption i, for the samples that have one.
        Column names match `variant`'s: caption i=0 is "caption", i=1 "caption2", ..."""
        rows = [(k, c[i]) for k, c in zip(self.keys, self.captions) if len(c) > i]
        return ("caption" if i == 0 else f"caption{i + 1}"), [k for k, _ in rows], [t for _, t in rows]

    def long_column(self) -> tuple[list[str], list[str]]:
        """(keys, texts) of the samples that have a long caption."""
        rows = [(k, t) for k, t in zip(self.keys, self.long) if t]
        return [k for k, _ in rows], [t for _, t in rows]

    @property
    def max_captions(self) -> int:
        return max((len(c) for c in self.captions), default=0)


def read_captions(path: Path, max_skip_fraction: float) -> tuple[CaptionTable, dict]:
    """Every sample's captions and skip counts, reading no image (see the module docstring)."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    skips = SkipCounter()
    keys, captions, long, origins = [], [], [], []
    for origin, (key, caps, long_caption) in _caption_records(resolve_data(path), skips):
        keys.append(key)
        captions.append(caps)
        long.append(long_caption)
        origins.append(origin)
    skips.check(max_skip_fraction, str(path))
    return CaptionTable(keys, captions, long, origins), skips.as_dict()


def _caption_records(source, skips):
    """(origin, (key, captions, long caption)) of every sample with valid text, in file order."""
    import json

    from vla.data.jsonl import line_image, read_manifest
    from vla.data.shards import IMAGE_EXTS, scan_shard

    if source.kind == "jsonl":
        for line in read_manifest(source.files[0]):
            try:
                meta = json.loads(line.data)
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                skips.seen += 1
                skips.skip("bad_json")
                continue
            key = meta.get("key")
            image = line_image(line, meta)  # a stat, not a read
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
