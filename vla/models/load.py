"""Turn what a user names as a model — a registry name, an open_clip pair, a training artifact,
an export — into something `vla eval` can score (a `DualEncoder`)."""

from __future__ import annotations

from pathlib import Path

from vla.models.encoder import DualEncoder

# artifact kinds that hold a scorable model; all of them are opened by vla.export.load
MODEL_KINDS = ("pretrain", "contrast-tune", "train-student", "export")


def load_encoder(ref: str) -> DualEncoder:
    from vla.artifacts import open_artifact
    from vla.export import load
    from vla.models.clip import load_clip

    if (Path(ref) / "manifest.json").exists():
        open_artifact(ref, MODEL_KINDS, role="a model argument")  # refuse other kinds clearly
        encoder = load(ref)
        encoder.name = Path(ref).name
        return encoder
    return load_clip(ref)
