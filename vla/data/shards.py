"""WebDataset shards exactly as img2dataset writes them: `00000.tar`, `00001.tar`, ... holding
`key.jpg` (or `.png` / `.webp`), `key.txt` and `key.json` per sample.

Reading validates every sample and skips a corrupt one, counting why in a `SkipCounter`; only a
broken shard (a truncated or non-tar file) is an error, since no sample after the break can be
trusted. `sample_from_parts` is the one place a sample's parts become a `Sample`; the JSONL
reader uses it too.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageFile

from vla.data.sample import Region, Sample
from vla.data.skips import SkipCounter
from vla.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_PIXELS = 64_000_000
# JSON fields that become Sample attributes; every other field (url, status, ...) stays in `meta`.
SAMPLE_FIELDS = ("key", "caption", "captions", "long_caption", "regions", "label")


class ShardWriter:
    """Write samples into numbered tar shards of at most `maxcount` samples each.

    Each shard is written to `NNNNN.tar.tmp` and renamed when complete, so a crash never leaves
    a truncated shard under a final name.
    """

    def __init__(self, out_dir: str | Path, maxcount: int = 1000, image_format: str = "jpg",
                 jpeg_quality: int = 95, start_index: int = 0):
        if image_format not in ("jpg", "png", "webp"):
            raise ValueError(f"image_format must be jpg, png or webp, not {image_format!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.maxcount = maxcount
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.index = start_index
        self.count_in_shard = 0
        self.total = 0
        self.shards: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        self._tmp = self.out_dir / f"{self.index:05d}.tar.tmp"
        self._tar = tarfile.open(self._tmp, "w")
        self.count_in_shard = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop .tmp
        os.replace(self._tmp, final)
        self.shards.append(final)
        self._tar = None
        self.index += 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # deterministic bytes for a deterministic world
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write_raw(self, key: str, members: dict[str, bytes]) -> None:
        """Write arbitrary members `key.<ext>`; used by tests to build corrupt samples."""
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            self._add(f"{key}.{ext}", data)
        self.count_in_shard += 1
        self.total += 1
        if self.count_in_shard >= self.maxcount:
            self._close()

    def write(self, sample: Sample) -> None:
        buf = io.BytesIO()
        if self.image_format == "jpg":
            sample.image.convert("RGB").save(buf, format="JPEG", quality=self.jpeg_quality)
        else:
            sample.image.save(buf, format=self.image_format.upper())
        self.write_raw(sample.key, {
            self.image_format: buf.getvalue(),
            "txt": sample.caption.encode("utf-8"),
            "json": json.dumps(sample.to_json(), ensure_ascii=False).encode("utf-8"),
        })

    def close(self) -> list[Path]:
        self._close()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)


# --- reading --------------------------------------------------------------------------------

@dataclass
class ShardRecord:
    """One sample's members in a shard: `ext -> (byte offset, size)` of each `key.<ext>`."""

    shard: Path
    key: str
    members: dict[str, tuple[int, int]]

    @property
    def where(self) -> str:
        """How a skip count names this sample."""
        return f"{self.shard.name} key {self.key}"

    def read(self, f: BinaryIO) -> dict[str, bytes]:
        """The members' bytes, read from `f`, the shard opened in binary mode."""
        out = {}
        for ext, (offset, size) in self.members.items():
            f.seek(offset)
            out[ext] = f.read(size)
        return out


# webdataset's `base_plus_ext`: the key runs to the first dot of the file's basename.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def scan_shard(shard: Path) -> list[ShardRecord]:
    """Read a shard's tar headers (not its data) and group consecutive members by key, as
    webdataset does. Raises UserError naming the shard when it is truncated or not a tar."""
    records: list[ShardRecord] = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                match = _MEMBER_NAME.match(m.name)
                if not m.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not records or records[-1].key != key:
                    records.append(ShardRecord(shard, key, {}))
                records[-1].members.setdefault(ext, (m.offset_data, m.size))
            end = tar.offset  # where tarfile stopped reading: the block after the last member
    except tarfile.ReadError as err:
        size = shard.stat().st_size
        if "unexpected end of data" in str(err) or "truncated" in str(err):
            raise UserError(f"{shard} is truncated (tar ends mid-member at byte {size}); "
                            f"re-write or re-download that shard") from None
        raise UserError(f"{shard} is not a readable tar archive ({err}); "
                        f"re-write or re-download that shard") from None
    _check_end_of_archive(shard, end, len(records))
    return records


def _check_end_of_archive(shard: Path, end: int, n_records: int) -> None:
    """A tar ends with zero blocks; Python's tarfile stops quietly at the end of the file, or at a
    damaged header, as if the archive ended there. So a shard cut exactly between two members
    would read as a shorter shard: what follows the last member must be a zero block."""
    with open(shard, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    _refuse_unended(shard, end, block, n_records)


def _refuse_unended(shard: Path | str, end: int, block: bytes, n_records: int) -> None:
    """UserError unless `block`, the bytes at `end` (after the last member), is a zero block."""
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return
    what = "ends" if not block else ("is cut inside a header" if len(block) < tarfile.BLOCKSIZE
                                     else "has a damaged header")
    samples = f"{n_records} sample{'' if n_records == 1 else 's'}"
    raise UserError(f"{shard} is truncated (it {what} at byte {end}, after {samples}, without the tar "
                    f"end-of-archive blocks); re-write or re-download that shard")


class _TailReader:
    """A read-only stream that counts the bytes read through it and keeps the last `keep` of them,
    so that the block after a streamed archive's last member can be checked (it cannot be sought)."""

    def __init__(self, raw: Any, keep: int = 1 << 16):
        self.raw, self.keep, self.pos, self.tail, self.tail_start = raw, keep, 0, bytearray(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.pos += len(data)
        self.tail += data
        if len(self.tail) > self.keep:
            cut = len(self.tail) - self.keep
            del self.tail[:cut]
            self.tail_start += cut
        return data

    def drain(self, limit: int = 1 << 20) -> None:
        """Read on to the end of the stream (at most `limit` more bytes: padding is short)."""
        start = self.pos
        while self.pos - start < limit and self.read(1 << 16):
            pass

    def block_at(self, offset: int) -> bytes:
        """The (up to) 512 bytes from `offset`; a non-zero block when they are no longer kept."""
        if offset < self.tail_start:
            return b"\1" * tarfile.BLOCKSIZE
        return bytes(self.tail[offset - self.tail_start: offset - self.tail_start + tarfile.BLOCKSIZE])


@dataclass
class StreamedRecord:
    """One sample of a streamed (`pipe:` or URL) shard, its members already read."""

    shard: str
    key: str
    members: dict[str, bytes]


def open_stream(url: str) -> BinaryIO:
    """A streamed shard's bytes: webdataset's `gopen` for its schemes (pipe:, http(s), gs, hf, ...),
    fsspec for the others; a missing fsspec backend is a UserError naming the package to install."""
    from urllib.parse import urlparse

    from webdataset.gopen import gopen, gopen_schemes

    scheme = urlparse(url).scheme
    if scheme in gopen_schemes:
        return gopen(url, "rb")
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as err:
        raise UserError(f"{url}: reading {scheme}:// needs an fsspec backend ({err}); install it, "
                        f"or stream the shards with --data 'pipe:CMD' (e.g. 'pipe:aws s3 cp {url} -')") from None


def stream_shard(url: str) -> list[StreamedRecord]:
    """A `pipe:` or URL shard read through webdataset's `gopen` (fsspec for the object stores
    webdataset has no opener for: s3://, gcs://, az://), its members grouped by key as webdataset
    groups them (the key runs to the first dot of the member's basename)."""
    records: list[StreamedRecord] = []
    try:
        with open_stream(url) as stream, tarfile.open(fileobj=(reader := _TailReader(stream)), mode="r|") as tar:
            for m in tar:
                match = _MEMBER_NAME.match(m.name)
                if not m.isfile() or match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if not records or records[-1].key != key:
                    records.append(StreamedRecord(url, key, {}))
                f = tar.extractfile(m)
                records[-1].members.setdefault(ext, f.read() if f is not None else b"")
            end = tar.offset  # the block after the last member: a stream cut there reads as a shorter one
            reader.drain()
    except (tarfile.TarError, OSError, ValueError) as err:
        raise UserError(f"{url}: cannot read it as a tar shard ({err}); check the address or the command") from None
    _refuse_unended(url, end, reader.block_at(end), len(records))
    return records


def iter_shard_samples(shard: Path, skips: SkipCounter, *, decode: bool = True,
                       max_image_pixels: int = MAX_IMAGE_PIXELS,
                       draft_size: int | None = None) -> Iterator[Sample]:
    """The valid samples of one shard, in order; corrupt ones are counted in `skips`.

    The whole shard's headers are read first, so a truncated shard fails before any sample."""
    records = scan_shard(Path(shard))
    with open(shard, "rb") as f:
        for record in records:
            sample = sample_from_members(record.key, record.read(f), skips, decode=decode,
                                         max_image_pixels=max_image_pixels, where=record.where,
                                         draft_size=draft_size)
            if sample is not None:
                yield sample


def iter_samples(paths: Sequence[Path], skips: SkipCounter, **kw: Any) -> Iterator[Sample]:
    """The valid samples of several shards, shard after shard."""
    for path in paths:
        yield from iter_shard_samples(path, skips, **kw)


def sample_from_members(key: str, members: dict[str, bytes], skips: SkipCounter,
                        **kw: Any) -> Sample | None:
    """A sample from its tar members `{ext: bytes}`: the image, `txt` and `json`; `where` (see
    `sample_from_parts`) defaults to the key."""
    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
    return sample_from_parts(key, members.get(image_ext) if image_ext else None, members.get("txt"),
                             members.get("json"), skips, **kw)


class _Skip(Exception):
    """Raised inside validation to skip a sample; `reason` is a SKIP_REASONS entry."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def sample_from_parts(key: str, image: bytes | None, txt: bytes | None,
                      meta: bytes | dict[str, Any] | None, skips: SkipCounter, *,
                      decode: bool = True, max_image_pixels: int = MAX_IMAGE_PIXELS,
                      where: str | None = None, draft_size: int | None = None) -> Sample | None:
    """Validate one sample's parts and build it, or count why it is skipped and return None.

    `txt` is the caption file's bytes; `meta` the JSON (bytes, or already parsed). The caption
    is `meta["captions"]` when present, else `txt`, else `meta["caption"]`. With `decode=False`
    the image is only opened (its header read, so its size is known and checked) and corrupt
    pixel data go undetected; with `decode=True` it is fully decoded and converted to RGB.
    `where` names the sample in the skip counts (default: its key).

    `draft_size=S`: a JPEG is decoded at the smallest of its DCT scales (1/1, 1/2, 1/4, 1/8) that
    keeps both sides at least S pixels (PIL's `Image.draft`), at a fraction of a full decode's
    cost, and the region boxes are scaled with it; other formats decode at full size. For a
    reader that resizes to S anyway (a CLIP of input size S). Validation sees the stored size.
    """
    skips.seen += 1
    try:
        return _build(key, image, txt, meta, decode, max_image_pixels, draft_size)
    except _Skip as skip:
        skips.skip(skip.reason, where or f"key {key}")
        return None


def _build(key: str, image: bytes | None, txt: bytes | None, meta: bytes | dict[str, Any] | None,
           decode: bool, max_image_pixels: int, draft_size: int | None = None) -> Sample:
    captions, long_caption, regions, label, meta = _texts(image is not None, txt, meta)
    img, (width, height) = _open_image(image, decode, max_image_pixels, draft_size)
    for r in regions:
        x0, y0, x1, y1 = r.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise _Skip("box_outside_image")
    if img.size != (width, height):  # decoded at a reduced size: boxes in its pixels
        sx, sy = img.width / width, img.height / height
        regions = [replace(r, box=(r.box[0] * sx, r.box[1] * sy, r.box[2] * sx, r.box[3] * sy))
                   for r in regions]
    return Sample(key=key, image=img, captions=captions, long_caption=long_caption, regions=regions,
                  label=label, meta={k: v for k, v in meta.items() if k not in SAMPLE_FIELDS})


def text_fields(has_image: bool, txt: bytes | None,
                meta: bytes | dict[str, Any] | None) -> tuple[list[str], str | None] | str:
    """A sample's (captions, long caption), validated as `sample_from_parts` does but without
    opening its image; or the skip reason. For reading captions at the cost of text alone."""
    try:
        captions, long_caption, *_ = _texts(has_image, txt, meta)
    except _Skip as skip:
        return skip.reason
    return captions, long_caption


def _texts(has_image: bool, txt: bytes | None, meta: bytes | dict[str, Any] | None):
    """(captions, long caption, regions, label, meta dict) of a sample, checked; raises _Skip."""
    if isinstance(meta, bytes):
        try:
            meta = json.loads(meta)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            raise _Skip("bad_json") from None
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise _Skip("bad_json")
    captions, long_caption, regions, label = _json_fields(meta)
    if not has_image:
        raise _Skip("missing_image")
    if txt is not None:
        try:
            txt_caption = txt.decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("non_utf8_caption") from None
        captions = captions or [txt_caption]
    if not captions and meta.get("caption") is not None:
        captions = [meta["caption"]]
    if not captions:
        raise _Skip("missing_caption")
    if any(not c.strip() for c in captions):
        raise _Skip("empty_caption")
    return captions, long_caption, regions, label, meta


def _json_fields(meta: dict[str, Any]) -> tuple[list[str], str | None, list[Region], int | None]:
    """The optional vla fields of a sample's JSON, type-checked (a wrong type is `bad_json`).
    `captions` is empty when the JSON has no `captions` list."""
    captions = meta.get("captions")
    if captions is not None and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
        raise _Skip("bad_json")
    long_caption, label = meta.get("long_caption"), meta.get("label")
    if any(v is not None and not isinstance(v, str) for v in (meta.get("caption"), long_caption)) or (
            label is not None and (not isinstance(label, int) or isinstance(label, bool))):
        raise _Skip("bad_json")
    try:
        regions = [Region.from_json(r) for r in meta.get("regions") or []]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _Skip("bad_json") from None
    if any(len(r.box) != 4 for r in regions):
        raise _Skip("bad_json")
    return list(captions or []), long_caption, regions, label


def _open_image(data: bytes, decode: bool, max_image_pixels: int,
                draft_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """The image (decoded unless `decode` is False, at a reduced size under `draft_size`) and
    its stored size, from the header."""
    if not data:
        raise _Skip("empty_file")
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; `max_image_pixels` below is the limit that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _Skip("decompression_bomb") from None
    except Exception as err:  # a decoder fed arbitrary bytes can raise anything
        raise _Skip(_decode_failure(err)) from None
    if img.width * img.height > max_image_pixels:
        raise _Skip("decompression_bomb")  # from the header alone: the pixels are never decoded
    stored = img.size
    if not decode:
        return img, stored
    if draft_size and img.format == "JPEG" and min(stored) > draft_size:
        # the scale keeps both sides >= draft_size (PIL picks the largest such reduction)
        img.draft(None, (stored[0] * draft_size // min(stored), stored[1] * draft_size // min(stored)))
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut image must fail, not load padded with grey
    try:
        img.load()
        return (img if img.mode == "RGB" else img.convert("RGB")), stored
    except Exception as err:
        raise _Skip(_decode_failure(err)) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def _decode_failure(err: Exception) -> str:
    return "truncated_image" if "truncat" in str(err).lower() else "undecodable_image"
