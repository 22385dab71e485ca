"""WebDataset shards exactly as img2dataset writes them: `00000.tar`, `00001.tar`, ... holding
`key.jpg` (or `.png` / `.webp`), `key.txt` and `key.json` per sample.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

from vla.data.sample import Sample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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


def list_shards(path: str | Path) -> list[Path]:
    """Shards of a directory (sorted `*.tar`), a single `.tar`, or a brace pattern is not needed:
    pass a directory. Raises FileNotFoundError naming the path when there are none."""
    p = Path(path)
    if p.is_file() and p.suffix == ".tar":
        return [p]
    if p.is_dir():
        shards = sorted(q for q in p.glob("*.tar"))
        if shards:
            return shards
    raise FileNotFoundError(str(p))


