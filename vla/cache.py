"""Feature cache for frozen models.

A frozen tower's output depends only on the model and the input, so it is computed once and
reused by every later stage and rerun, the way LLM2CLIP stores its LLM embeddings beside the
image shards. An entry is keyed by (what was encoded, the model's digest, the data's digest):
change any of them and a new entry is computed; nothing is ever silently stale.

Entries live beside the data in `<data dir>/.vla-features/` (or `$VLA_CACHE_DIR` when the data
directory is read-only): `<name>-<key>.npy` (float16 rows, in `keys` order) and `.json` (keys
and metadata). Writes are atomic, so an interrupted computation leaves no entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from vla import progress
from vla.textbatch import encode_length_sorted

CACHE_DIRNAME = ".vla-features"


@dataclass
class FeatureTable:
    """Rows of features addressed by sample key (and text variant)."""

    keys: list[str]
    features: np.ndarray  # (N, D) float16
    meta: dict

    def __post_init__(self) -> None:
        self.index = {k: i for i, k in enumerate(self.keys)}

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        rows = [self.index[k] for k in keys]
        return torch.from_numpy(self.features[rows].astype(np.float32))


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def cache_dir_for(data_dir: Path | str) -> Path:
    override = os.environ.get("VLA_CACHE_DIR")
    if not Path(data_dir).is_dir():  # a shard range, a URL, one file: nothing to put a cache beside
        root = Path(override) if override else Path.home() / ".cache" / "vla" / "features"
        return root / cache_key(str(data_dir))
    if override:
        return Path(override) / cache_key(str(Path(data_dir).resolve()))
    return Path(data_dir) / CACHE_DIRNAME


def cached_features(
    data_dir: Path,
    name: str,
    *,
    model_digest: str,
    data_digest: str,
    keys: Sequence[str],
    inputs: Sequence,
    encode: Callable[[Sequence], torch.Tensor],
    batch_size: int = 256,
) -> tuple[FeatureTable, bool]:
    """Return (table, hit). On a miss, encode `inputs` in batches and store them under the key.

    `keys[i]` names the row of `inputs[i]`; `name` says what was encoded (e.g.
    "minilm.long_caption"), so several text variants of one data set get separate entries.
    """
    root = cache_dir_for(data_dir)
    # the inputs themselves are part of the key: two variants of one data set (first caption,
    # second caption, long caption) can never be confused, whatever they are named
    texts_digest = hashlib.sha256("\0".join(map(str, inputs)).encode()).hexdigest()
    key = cache_key(name, model_digest, data_digest, texts_digest)
    stem = f"{name.replace('/', '_')}-{key}"
    npy, meta_path = root / f"{stem}.npy", root / f"{stem}.json"
    if npy.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        return FeatureTable(meta.pop("keys"), np.load(npy, mmap_mode="r"), meta), True

    # computing a cache entry can take minutes (an LLM over every caption): show it on a terminal
    # a bar on a terminal, a plain line every 30 s in a log (vla/progress.py)
    with progress.counter(len(inputs), f"caching {name}", "texts") as bar:
        feats = _encode_all(encode, inputs, batch_size, bar.update)
    meta = {"name": name, "model_digest": model_digest, "data_digest": data_digest,
            "count": len(keys), "dim": int(feats.shape[1]) if feats.size else 0}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{stem}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, feats)
        os.replace(tmp, npy)
        tmp = root / f".{stem}.json.tmp"
        tmp.write_text(json.dumps({**meta, "keys": list(keys)}))
        os.replace(tmp, meta_path)
    except OSError:
        pass  # a read-only data directory: the features are still returned, just not kept
    return FeatureTable(list(keys), feats, meta), False


def _encode_all(encode: Callable[[Sequence], torch.Tensor], inputs: Sequence, batch_size: int,
                on_batch: Callable[[int], None]) -> np.ndarray:
    """(N, D) float16 features of `inputs`; texts go in length-sorted batches (less padding)."""
    if not len(inputs):
        return np.zeros((0, 0), np.float16)

    def run(batch: Sequence) -> torch.Tensor:
        with torch.no_grad():
            return encode(batch).float().cpu()

    texts = all(isinstance(x, str) for x in inputs)
    return encode_length_sorted(run, inputs, batch_size, on_batch, by_length=texts).numpy().astype(np.float16)
