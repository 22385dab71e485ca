"""Where training data is: `resolve_data` turns `--data` into a `DataSource` — a directory of
`*.tar` shards, one `.tar`, a `.jsonl` manifest, or shards named the way webdataset names them
(brace ranges `/shards/{00000..00999}.tar`, `::`-joined lists, globs, `pipe:CMD`, http(s)/gs/hf/s3
URLs; expanded by webdataset's own `expand_urls`). A source lists its record handles, loads one
record, iterates every valid sample, and has a cheap digest (names, sizes, modification times)."""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from vla.data.jsonl import ManifestLine, iter_jsonl_samples, line_image, read_manifest, sample_from_line
from vla.data.sample import Sample
from vla.data.shards import ShardRecord, StreamedRecord, sample_from_members, scan_shard, stream_shard
from vla.data.skips import SkipCounter
from vla.errors import UserError

Record = ShardRecord | ManifestLine | StreamedRecord
Shard = Path | str  # a local file, or a URL webdataset opens (pipe:, http(s):, ...)


@dataclass(frozen=True)
class DataSource:
    """Image–text data: WebDataset shards (`kind="shards"`) or a JSONL manifest (`kind="jsonl"`,
    whose one file is the manifest). `path` is what the user named: a local path, or the shard
    specification as given (`/shards/{00000..00099}.tar`, `pipe:...`)."""

    path: Path | str
    kind: str
    files: tuple[Shard, ...]

    def iter_samples(self, skips: SkipCounter, **kw: Any) -> Iterator[Sample]:
        """Every valid sample in file order (for evaluation and precomputation)."""
        if self.kind == "jsonl":
            return iter_jsonl_samples(self.files[0], skips, **kw)
        return (s for f in self.files for s in self._shard_samples(f, skips, **kw) if s is not None)

    def _shard_samples(self, shard: Shard, skips: SkipCounter, **kw: Any) -> Iterator[Sample | None]:
        records = self.records(shard)  # the whole index first: a truncated shard fails before any sample
        if isinstance(shard, str):
            yield from (self.load(r, skips, **kw) for r in records)
            return
        with open(shard, "rb") as f:
            for r in records:
                yield sample_from_members(r.key, r.read(f), skips, **kw)

    def records(self, file: Shard) -> list[Record]:
        """The record handles of one file, in order; a local shard's without reading image bytes."""
        if self.kind == "jsonl":
            return read_manifest(file)
        return stream_shard(file) if isinstance(file, str) else scan_shard(file)

    def load(self, record: Record, skips: SkipCounter, **kw: Any) -> Sample | None:
        if isinstance(record, ManifestLine):
            return sample_from_line(record, skips, **kw)
        if isinstance(record, StreamedRecord):
            return sample_from_members(record.key, record.members, skips, **kw)
        with open(record.shard, "rb") as f:
            return sample_from_members(record.key, record.read(f), skips, where=record.where, **kw)

    def digest(self) -> str:
        """sha256 (hex) identifying the data, cheap to recompute on every rank in every stage:
        each local shard's name, size and modification time (never its bytes), each URL as
        written, and for a manifest the same of the manifest and of every image it names. A copy
        that keeps modification times (`cp -p`, `rsync -a`, `shutil.copytree`) has the same
        digest; an edited file has a new one."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(_stat_line(f.name, f) if isinstance(f, Path) else f"{f}\0".encode())
        if self.kind == "jsonl":
            for line in read_manifest(self.files[0]):
                h.update(_stat_line(f"line {line.lineno}", line_image(line)))
        return h.hexdigest()


def _stat_line(name: str, path: Path | None) -> bytes:
    try:
        st = path.stat() if path is not None else None
    except OSError:
        st = None
    return json.dumps([name, st.st_size, st.st_mtime_ns] if st else [name, None]).encode() + b"\n"


#: streamed addresses: webdataset's own openers (vla.data.shards.stream_shard), and the object
#: stores fsspec opens with its backend installed (s3fs, gcsfs, adlfs)
_URL_SCHEMES = ("pipe", "http", "https", "gs", "htgs", "ais", "sftp", "ftps", "scp", "hf",
                "s3", "s3a", "gcs", "az", "abfs", "abfss")


def resolve_data(path: str | Path) -> DataSource:
    """`--data` as a source: a directory of `*.tar` shards, one `.tar`, a `.jsonl` manifest, or a
    shard specification as webdataset takes it: brace ranges, `::` lists, globs, `pipe:` and
    URLs. UserError naming what does not exist."""
    text = str(path)
    p = Path(text)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
        if not shards:
            raise UserError(f"{p}: no *.tar shards in this directory; point --data at WebDataset shards "
                            f"(a directory, '/shards/{{00000..00099}}.tar', a glob, pipe:CMD) or a .jsonl manifest")
        return DataSource(p, "shards", tuple(shards))
    if p.is_file():
        if p.suffix == ".jsonl":
            return DataSource(p, "jsonl", (p,))
        if p.suffix == ".tar":
            return DataSource(p, "shards", (p,))
        raise UserError(f"{p} is neither a .tar shard nor a .jsonl manifest")
    from webdataset.shardlists import expand_urls

    urls = expand_urls(text)  # webdataset's own: `::` lists, environment variables, braces
    files: list[Shard] = []
    missing: list[str] = []
    for url in urls:
        scheme = urlparse(url).scheme
        if scheme in _URL_SCHEMES:
            files.append(url)
            continue
        local = url.removeprefix("file://").removeprefix("file:")
        if glob.has_magic(local):
            found = sorted(Path(m) for m in glob.glob(local) if Path(m).is_file())
            files += found
            if not found:
                missing.append(local)
        elif Path(local).is_file():
            files.append(Path(local))
        else:
            missing.append(local)
    if len(urls) == 1 and missing:
        raise UserError(f"--data {text} does not exist" + ("" if not glob.has_magic(text) else " (the glob matches nothing)"))
    if missing:
        raise UserError(f"--data {text}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    return DataSource(text, "shards", tuple(files))
