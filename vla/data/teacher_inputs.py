"""What DCLIP's teacher and student stages both read: one caption per image, the frozen CLIP text
tower's outputs for it (cached), and the teacher's inputs assembled by sample key.

The text tower's outputs are cached once per (CLIP, data, captions) in the feature cache as one
row per caption: [pooled embedding (D) | token states (L·D) | real-token mask (L)], so an epoch of
the teacher, and the student's teacher targets, never run the text encoder again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vla.errors import UserError

TEXT_STATES = "dclip.text_states"


def caption_for(seed: int, key: str, captions: Sequence[str]) -> str:
    """The caption sample `key` trains on: fixed by (seed, key), so every epoch, worker and
    resumed run use the same one (as `vla pretrain` chooses)."""
    return random.Random(f"{seed}:{key}").choice(list(captions))


def read_drawn_captions(path: Path | str, seed: int,
                        max_skip_fraction: float) -> tuple[list[str], "DrawnCaptions", dict]:
    """(keys, each key's one caption drawn by `seed`, skip counts) of every valid sample, images
    not decoded (`vla.data.captions.read_captions` gives every caption column instead). The
    keys are held (training picks rows by key); the captions are a stream, read from the data
    again on each pass (see `DrawnCaptions`), so the texts are never all in memory."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    skips = SkipCounter()
    source = resolve_data(path)
    keys = [s.key for s in source.iter_samples(skips, decode=False)]
    skips.check(max_skip_fraction, str(path))
    return keys, DrawnCaptions(source, seed, keys), skips.as_dict()


@dataclass(frozen=True)
class DrawnCaptions:
    """Each sample's caption (`caption_for`), in data order, re-read from the data each time it is
    iterated; it checks the keys are still those `read_drawn_captions` found."""

    source: object              # vla.data.stream.DataSource
    seed: int
    keys: Sequence[str]

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        from vla.data.skips import SkipCounter

        n = 0
        for s in self.source.iter_samples(SkipCounter(), decode=False):
            if n >= len(self.keys) or s.key != self.keys[n]:
                break
            yield caption_for(self.seed, s.key, s.captions)
            n += 1
        else:
            if n == len(self.keys):
                return
        raise UserError(f"{self.source.path} changed while its captions were read; rerun when it no longer changes")


@dataclass
class TextStates:
    """The cached text-tower rows of one caption per key."""

    table: object            # vla.cache.FeatureTable
    context: int             # L
    dim: int                 # D

    def lookup(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """`text` (B, D) pooled embeddings, `tokens` (B, L, D), `token_mask` (B, L) bool."""
        rows = self.table.lookup(keys)
        d, n = self.dim, self.context
        return {"text": rows[:, :d], "tokens": rows[:, d:d + n * d].reshape(-1, n, d),
                "token_mask": rows[:, d + n * d:] > 0.5}

    def pooled(self, keys: Sequence[str]) -> torch.Tensor:
        """(B, D) pooled text embeddings alone (a row's first D columns: no token states read)."""
        rows = self.table.rows_of(keys)
        return torch.from_numpy(self.table.features[rows, :self.dim].astype("float32"))


def cached_text_states(clip, clip_identity: str, data_dir: Path, data_digest: str, keys: list[str],
                       texts: list[str], batch_size: int) -> TextStates:
    """The frozen text tower's outputs for `texts` (from the cache, computed on a miss)."""
    from vla.cache import cached_features
    from vla.models.dclip import clip_text_states

    context, dim = int(clip.text_context_length), int(clip.embed_dim)
    device = next(clip.model.parameters()).device

    @torch.no_grad()
    def encode(batch: Sequence[str]) -> torch.Tensor:
        tokens = clip.tokenizer(list(batch)).to(device)
        states, mask, pooled = clip_text_states(clip.model.eval(), tokens)
        return torch.cat([pooled, states.flatten(1), mask.to(states.dtype)], dim=1).float().cpu()

    table, _hit = cached_features(TEXT_STATES, lambda: ((k, t, str(data_dir)) for k, t in zip(keys, texts)),
                                  model_identity=clip_identity, data_digest=data_digest, encode=encode,
                                  batch_size=batch_size)
    return TextStates(table, context, dim)


def teacher_inputs(store, text: TextStates, keys: Sequence[str], top_k: int | None) -> dict[str, torch.Tensor]:
    """The meta-teacher's keyword inputs for a batch of sample keys."""
    r = store.lookup(keys, top_k)
    t = text.lookup(keys)
    return {"tokens": t["tokens"], "token_mask": t["token_mask"], "text": t["text"], "regions": r["regions"],
            "region_mask": r["mask"], "conf": r["conf"], "area": r["area"]}


def open_regions(path: str | Path, role: str = "--regions"):
    """A precompute-regions artifact and its regions table."""
    from vla.artifacts import open_artifact
    from vla.data.regions import RegionStore

    if not path:
        raise UserError(f"{role} is required: pass a precompute-regions artifact (make one with "
                        f"`vla precompute-regions`)")
    art = open_artifact(path, "precompute-regions", role=role)
    return art, RegionStore.open(art.path / "regions")


def check_same_clip(store, clip_identity: str, clip_name: str, regions_path) -> None:
    """Refuse a regions table built with another CLIP than the one the stage uses."""
    if store.meta["clip"] != clip_identity:
        raise UserError(f"{regions_path} was built with another CLIP ({store.meta['clip'][:16]}) than {clip_name} "
                        f"({clip_identity[:16]}); rebuild it with `vla precompute-regions --clip {clip_name}` "
                        f"or pass the CLIP it was built with")


def data_of(art) -> str:
    """The --data an artifact was built from (its recorded input path)."""
    ref = art.manifest.get("inputs", {}).get("data")
    if not ref:
        raise UserError(f"{art.path} records no data input; pass --data")
    return ref["path"]


def check_keys(store, keys: Sequence[str], data: Path, regions_path) -> None:
    """Refuse a regions table built from other data than `data`, or lacking some of its keys."""
    from vla.data.lineage import check_built_from

    check_built_from(regions_path, store.meta.get("data_digest"), _recorded_data(regions_path), data,
                     f"vla precompute-regions --data {data} --force")
    missing = [k for k in keys if k not in store]
    if missing:
        raise UserError(f"{len(missing)} samples of {data} (e.g. {missing[0]!r}) are not in the regions table "
                        f"{regions_path}; build the table from the same data with `vla precompute-regions`")


def _recorded_data(artifact_path) -> str | None:
    """The data path an artifact's manifest records, for messages."""
    import json

    try:
        return json.loads((Path(artifact_path) / "manifest.json").read_text())["inputs"]["data"]["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
