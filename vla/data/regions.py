"""DCLIP's regions table: per image, its detected boxes and their frozen-CLIP embeddings.

Written by `vla precompute-regions`, read by key by `train-teacher` and `train-student`. It must
scale to millions of images, so like the feature cache it is arrays on disk, memory-mapped and
read row by row, never loaded whole:

    regions/index.json                 dim, top_k (null: every detection kept), the CLIP and detector used,
                                       shard list, counts
    regions/shard-00000/keys.json      the shard's sample keys, in row order
    regions/shard-00000/global.npy     (n, D) float16  the whole image's embedding (not a region: the
                                                       "no regions" arm and the preservation target)
    regions/shard-00000/offsets.npy    (n+1,) int64    image i's regions are rows offsets[i]:offsets[i+1]
    regions/shard-00000/emb.npy        (R, D) float16  region embeddings (L2-normalised)
    regions/shard-00000/boxes.npy      (R, 4) float32  x0, y0, x1, y1 in pixels of the image
    regions/shard-00000/conf.npy       (R,)   float32  detector confidence (1 for the whole-image region
                                                       of an image with no usable detection)
    regions/shard-00000/cls.npy        (R,)   int32    detector class (−1: no class)
    regions/shard-00000/area.npy       (R,)   float32  box area / image area
    regions/shard-00000/counts.json    what the shard's records gave (images, skips, drops)

A shard covers a fixed range of the data's records (skipped ones included), so a rerun knows
which records the finished shards hold without reading them; each shard is written into a
temporary directory and renamed, so a crash leaves either a whole shard or none.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vla.errors import UserError

INDEX = "index.json"
ARRAYS = ("global", "offsets", "emb", "boxes", "conf", "cls", "area")


@dataclass
class ImageRegions:
    """One image's regions as the writer receives them."""

    key: str
    global_emb: np.ndarray          # (D,)
    emb: np.ndarray                 # (k, D)
    boxes: np.ndarray               # (k, 4)
    conf: np.ndarray                # (k,)
    cls: np.ndarray                 # (k,)
    area: np.ndarray                # (k,)


def clean_boxes(boxes: Sequence[Sequence[float]], width: int, height: int,
                min_size: float = 1.0) -> tuple[list[int], dict[str, int]]:
    """Indices of the usable boxes, and the dropped ones counted by reason.

    A box with a NaN or infinite coordinate is `nan`; one that lies wholly outside the image is
    `outside`; one that, clipped to the image, is narrower or lower than `min_size` pixels is
    `empty`. A box partly outside is kept and clipped by the caller (`clip_box`).
    """
    kept, dropped = [], {"nan": 0, "outside": 0, "empty": 0}
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            dropped["nan"] += 1
        elif x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            dropped["outside"] += 1
        elif min(x1, width) - max(x0, 0) < min_size or min(y1, height) - max(y0, 0) < min_size:
            dropped["empty"] += 1
        else:
            kept.append(i)
    return kept, dropped


def clip_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A box clipped to the image, widened to whole pixels (what a crop takes)."""
    x0, y0, x1, y1 = box
    return (max(0, math.floor(x0)), max(0, math.floor(y0)), min(width, math.ceil(x1)), min(height, math.ceil(y1)))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def finished_shards(root: Path) -> list[int]:
    """The shards a previous (interrupted) run finished, in order."""
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("shard-*") if p.is_dir() and (p / "counts.json").exists())


def new_counts() -> dict:
    """A shard's counts before its first image: what `write_shard` stores and `write_index` sums
    (images seen and skipped by reason, regions kept, images with none, regions past top-k, and
    boxes dropped by reason)."""
    return {"data": {"seen": 0, "skipped": {}}, "regions": 0, "no_detection": 0, "regions_over_top_k": 0,
            "boxes_dropped": {"nan": 0, "outside": 0, "empty": 0}}


def write_shard(root: Path, index: int, images: list[ImageRegions], dim: int, counts: dict) -> None:
    """Write one shard atomically (temporary directory, then rename)."""
    tmp = root / f".{shard_name(index)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sizes = [len(im.conf) for im in images]
    arrays = {
        "global": np.stack([im.global_emb for im in images]).astype(np.float16) if images
        else np.zeros((0, dim), np.float16),
        "offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "emb": np.concatenate([im.emb for im in images]).astype(np.float16) if images else np.zeros((0, dim), np.float16),
        "boxes": np.concatenate([im.boxes for im in images]).astype(np.float32) if images else np.zeros((0, 4), np.float32),
        "conf": np.concatenate([im.conf for im in images]).astype(np.float32) if images else np.zeros(0, np.float32),
        "cls": np.concatenate([im.cls for im in images]).astype(np.int32) if images else np.zeros(0, np.int32),
        "area": np.concatenate([im.area for im in images]).astype(np.float32) if images else np.zeros(0, np.float32),
    }
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    (tmp / "keys.json").write_text(json.dumps([im.key for im in images]))
    (tmp / "counts.json").write_text(json.dumps(counts))  # last: its presence marks the shard whole
    final = root / shard_name(index)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def write_index(root: Path, meta: dict) -> dict:
    """Sum the shards' counts and write index.json; returns the summed counts."""
    shards = finished_shards(root)
    total: dict = {}
    for i in shards:
        _add_counts(total, json.loads((root / shard_name(i) / "counts.json").read_text()))
    (root / INDEX).write_text(json.dumps({**meta, "shards": [shard_name(i) for i in shards], "counts": total},
                                         indent=1) + "\n")
    return total


def _add_counts(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        if isinstance(v, dict):
            _add_counts(into.setdefault(k, {}), v)
        else:
            into[k] = into.get(k, 0) + v


@dataclass
class _Shard:
    arrays: dict[str, np.ndarray]
    keys: list[str]


def _open_shard(d: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """A shard's arrays (memory-mapped) and keys; UserError naming a damaged or missing file."""
    from vla.data.npy import open_npy

    fix = f"the regions table {d.parent} is damaged: rebuild it with `vla precompute-regions --force`"
    arrays = {a: open_npy(d / f"{a}.npy", fix=fix) for a in ARRAYS}
    try:
        keys = json.loads((d / "keys.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{d / 'keys.json'} cannot be read ({type(e).__name__}); {fix}") from None
    offsets = arrays["offsets"]
    if len(offsets) != len(keys) + 1 or len(arrays["global"]) != len(keys) or int(offsets[-1]) > len(arrays["emb"]):
        raise UserError(f"{d} holds arrays of inconsistent lengths ({len(keys)} keys); {fix}")
    return arrays, keys


@dataclass
class RegionStore:
    """The regions table, memory-mapped; `lookup(keys)` gives padded batches for the teacher."""

    root: Path
    meta: dict
    shards: list[_Shard] = field(repr=False)
    index: dict[str, tuple[int, int]] = field(repr=False)  # key → (shard, row)

    @classmethod
    def open(cls, root: Path) -> "RegionStore":
        root = Path(root)
        if not (root / INDEX).is_file():
            raise UserError(f"{root} holds no regions table ({INDEX} missing); rebuild it with `vla precompute-regions`")
        meta = json.loads((root / INDEX).read_text())
        shards, index = [], {}
        for s, name in enumerate(meta["shards"]):
            d = root / name
            arrays, keys = _open_shard(d)
            shards.append(_Shard(arrays, keys))
            index.update((k, (s, row)) for row, k in enumerate(keys))
        return cls(root, meta, shards, index)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def top_k(self) -> int | None:
        """The most regions per image the table kept (None: every detection)."""
        return None if self.meta.get("top_k") is None else int(self.meta["top_k"])

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def keys(self) -> list[str]:
        return [k for s in self.shards for k in s.keys]

    def image(self, key: str) -> dict[str, np.ndarray]:
        """One image's arrays: global (D,), and emb, boxes, conf, cls, area of its regions."""
        s, row = self.index[key]
        a = self.shards[s].arrays
        lo, hi = int(a["offsets"][row]), int(a["offsets"][row + 1])
        return {"global": np.asarray(a["global"][row]),
                **{n: np.asarray(a[n][lo:hi]) for n in ("emb", "boxes", "conf", "cls", "area")}}

    def lookup(self, keys: Sequence[str], top_k: int | None = None) -> dict[str, torch.Tensor]:
        """The teacher's region inputs for `keys`: `regions` (B, K, D), each image's regions in
        confidence order (the detector's crops; for an image with no usable detection, its one
        whole-image region with confidence 1 and area 1, as `precompute-regions` stored it),
        `conf`, `area` (B, K) and `mask` (B, K, True for real entries), K the most regions of an
        image in the batch. `top_k` keeps at most that many per image (default: all the table
        holds); `top_k=0` gives the whole image's embedding alone, with confidence 1 and area 1
        (the "no regions" ablation). The whole image is never added beside crops."""
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise UserError(f"sample {missing[0]!r} is not in the regions table {self.root}; build the table "
                            f"from the same --data with `vla precompute-regions`")
        images = [self.image(key) for key in keys]
        b = len(keys)
        if top_k == 0:
            regions = np.stack([im["global"] for im in images]).astype(np.float32)[:, None, :]
            ones = np.ones((b, 1), np.float32)
            return {"regions": torch.from_numpy(regions), "conf": torch.from_numpy(ones),
                    "area": torch.from_numpy(ones.copy()), "mask": torch.ones(b, 1, dtype=torch.bool)}
        sizes = [len(im["conf"]) if top_k is None else min(top_k, len(im["conf"])) for im in images]
        k_max = max(sizes + [1])
        regions = np.zeros((b, k_max, self.dim), np.float32)
        conf = np.zeros((b, k_max), np.float32)
        area = np.zeros((b, k_max), np.float32)
        mask = np.zeros((b, k_max), bool)
        for i, (im, n) in enumerate(zip(images, sizes)):
            regions[i, :n] = im["emb"][:n]
            conf[i, :n] = im["conf"][:n]
            area[i, :n] = im["area"][:n]
            mask[i, :n] = True
        return {"regions": torch.from_numpy(regions), "conf": torch.from_numpy(conf),
                "area": torch.from_numpy(area), "mask": torch.from_numpy(mask)}
