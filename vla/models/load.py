"""Turn what a user names as a model — a registry name, an open_clip pair, a training artifact,
an export — into something `vla eval` can score (a `DualEncoder`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vla.models.encoder import DualEncoder

if TYPE_CHECKING:
    import torch

# artifact kinds that hold a scorable model; all of them are opened by vla.stages.export.load
MODEL_KINDS = ("pretrain", "contrast-tune", "train-student", "export")
# MM-GEM stages' artifacts: `model/` is what save_mmgem wrote
MMGEM_KINDS = ("joint-train", "stage2-roi")


def load_encoder(ref: str, device: str | torch.device = "cpu") -> DualEncoder:
    """The model `ref` names, its networks on `device` (its encode_* still return CPU tensors)."""
    from vla.artifacts import open_artifact
    from vla.stages.export import load
    from vla.models.clip import load_clip

    if (Path(ref) / "manifest.json").exists():
        art = open_artifact(ref, MODEL_KINDS + MMGEM_KINDS, role="a model argument")  # refuse other kinds clearly
        if art.kind in MMGEM_KINDS:
            from vla.models.mmgem import load_mmgem

            encoder = load_mmgem(art.file("model"))
        else:
            encoder = load(ref)
        encoder.name = Path(ref).name
    else:
        encoder = load_clip(ref)
    return encoder.to(device)


def model_identity(ref: str) -> str:
    """What a cache key or a manifest calls a model: an artifact's content digest, else its name."""
    import json

    if (Path(ref) / "manifest.json").exists():
        return json.loads((Path(ref) / "manifest.json").read_text())["digest"]
    return ref
