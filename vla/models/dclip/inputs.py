"""What DCLIP's teacher and student stages both read: each image's captions (one drawn per epoch),
the frozen CLIP text tower run on the training device, and the teacher's inputs by sample key.

Each epoch, every training image trains on one of its captions, drawn anew: `caption_index`
seeds a generator by (seed, epoch, sample key) with the data stream's `sample_seed`, so the draw
is the same whatever the number of ranks or workers and after a resume, and new every epoch
(as `vla contrast-tune` draws its captions). train-teacher draws it from its row batches' epoch;
train-student draws it first in its image transform, from the generator the stream seeds with the
same (seed, epoch, key), which gives the same index.

The frozen text tower runs on the training device, on each batch's drawn captions (`TextTower`):
its token states are those of the tokens strictly between the start and end tokens, only as many
positions as the batch's longest caption needs (`vla.models.dclip.clip_text_states`), so nothing
of 77 padded positions per caption is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from vla.errors import UserError


def caption_index(seed: int, epoch: int, key: str, n: int) -> int:
    """Which of its `n` captions sample `key` trains on in `epoch`: `torch.randint(n)` from a
    generator seeded with `sample_seed(seed, epoch, key)` — the draw train-student's transform
    makes first under the data stream's per-sample seed, so both stages draw alike."""
    from vla.data.stream import sample_seed

    if n == 1:
        return 0
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, key))
    return int(torch.randint(n, (), generator=g))


def read_caption_lists(path: Path, max_skip_fraction: float) -> tuple[list[str], list[tuple[str, ...]], dict]:
    """(keys, each key's captions, skip counts) of every sample with valid text, in data order,
    reading only the samples' text members (no image is opened: `vla.data.captions`). The
    captions are held in memory, as the regions table's key index is (one row per image)."""
    from vla.data.captions import read_captions

    captions, skips = read_captions(path, max_skip_fraction)
    keys, texts = [], []
    for _origin, key, caps, _long in captions.records():
        keys.append(key)
        texts.append(tuple(caps))
    return keys, texts, skips


@dataclass
class TextTower:
    """The frozen CLIP text tower on the training device: `tokenize` on the host (in the batch
    functions), `states` on the device (in the step)."""

    clip: object                     # vla.models.clip.ClipModel, frozen

    @classmethod
    def on(cls, clip, device) -> "TextTower":
        """The CLIP frozen, in eval mode, on `device` (a stage that trains its image tower sets that
        tower back to train mode afterwards)."""
        for p in clip.model.parameters():
            p.requires_grad_(False)
        clip.model.to(device).eval()
        return cls(clip)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clip.tokenizer(list(texts))

    @torch.no_grad()
    def states(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token states (B, L, D), mask (B, L), pooled u (B, D)), see `clip_text_states`."""
        from vla.models.dclip import clip_text_states

        return clip_text_states(self.clip.model, token_ids)


def teacher_inputs(regions: dict[str, torch.Tensor], states: torch.Tensor, mask: torch.Tensor,
                   pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """The meta-teacher's keyword inputs from a batch's regions (`RegionStore.lookup`, moved to
    the device) and its text tower outputs (`TextTower.states`)."""
    return {"tokens": states, "token_mask": mask, "text": pooled, "regions": regions["regions"],
            "region_mask": regions["mask"], "conf": regions["conf"], "area": regions["area"]}


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

def global_batch(batch_size: int, world_size: int, what: str) -> int:
    """This rank's share of the global `train.batch_size`; refused unless the ranks share it equally."""
    if batch_size % world_size:
        raise UserError(f"{what}: train.batch_size {batch_size} is the global batch and must divide evenly over "
                        f"{world_size} ranks; choose a multiple of {world_size}")
    return batch_size // world_size


def steps_per_epoch(images: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over `images`: each step takes grad_accum global batches of
    batch_size (an epoch's last partial step is left out); refused when that is none."""
    steps = images // batch_size // grad_accum
    if steps < 1:
        raise UserError(f"{images} images make no optimizer step of train.batch_size={batch_size} × "
                        f"train.grad_accum={grad_accum}; lower them")
    return steps
