"""Turn what a user names as a model — a registry name, an open_clip pair, a training artifact,
an export — into something `vla eval` can score (a `DualEncoder`); `load` is `vla.load`, which
reads what `vla export` (vla/stages/export.py) wrote."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vla.models.encoder import DualEncoder

if TYPE_CHECKING:
    import torch

# artifact kinds that hold a scorable model; all of them are opened by `load`
MODEL_KINDS = ("pretrain", "contrast-tune", "train-student", "export")
# MM-GEM stages' artifacts: `model/` is what save_mmgem wrote
MMGEM_KINDS = ("joint-train", "stage2-roi")
# what `vla.load` opens: an export, or any artifact `vla export` exports (vla.stages.export.SOURCES)
LOADABLE_KINDS = ("export", "contrast-tune", "pretrain", "train-student", *MMGEM_KINDS)


def load_encoder(ref: str, device: str | torch.device = "cpu") -> DualEncoder:
    """The model `ref` names, its networks on `device` (its encode_* still return CPU tensors)."""
    from vla.artifacts import open_artifact
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


def load(path: str | Path):
    """Load a model for inference: an export (or a contrast-tune / pretrain artifact).

    Returns a `ProCLIPModel` (image tower + embedder + adapter) or, for a plain CLIP, a
    `ClipModel`; both have `encode_image`, `encode_text` (one item or a list in, a (N, D)
    normalised float32 matrix out), `preprocess`, `tokenize` and `text_context_length`.
    An MM-GEM export (or joint-train / stage2-roi artifact) gives an `MMGEM`: `encode_image(images)`,
    `encode_text(texts)`, `encode_regions(images, boxes)` and `caption(images, boxes=None)`.
    """
    from vla.artifacts import lineage, open_artifact
    from vla.errors import UserError
    from vla.models.clip import load_clip
    from vla.models.proclip import load_proclip_dir

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; vla.load takes the directory `vla export` wrote")
    if not (path / "manifest.json").exists():
        raise UserError(f"{path} is not a vla export (no manifest.json); make one with `vla export SRC --out {path}`")
    art = open_artifact(path, LOADABLE_KINDS, role="vla.load")
    model_dir = path if art.kind == "export" else path / "model"
    from vla.models.mmgem import CONFIG_FILE

    if (model_dir / CONFIG_FILE).exists():  # MM-GEM: refuses an LM tokenizer without the recorded tokens
        from vla.models.mmgem import load_mmgem

        model = load_mmgem(model_dir)
        model.name = path.name
        return model
    if (path / "adapter.json").exists():
        model = load_proclip_dir(path, model_dir=model_dir)
        model.lineage = [f"{art.kind} {path}"] + [f"{'  ' * (d + 1)}{role}: {r.get('kind')} {r.get('path')}"
                                                  for d, role, r in lineage(art.manifest)]
        return model
    return load_clip("local-dir:" + str(model_dir))
