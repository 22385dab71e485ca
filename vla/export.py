"""`vla export`: a self-contained directory a user can take away, and `vla.load` to read it.

Layout (also an artifact, kind "export", so `vla eval` and `vla inspect` accept it):

    open_clip_config.json, open_clip_model.safetensors   the CLIP whose image tower was tuned, in
                                                         open_clip's own layout:
                                                         open_clip.create_model_and_transforms("local-dir:DIR")
    adapter.safetensors, adapter.json                    the adapter g (ProCLIP / LLM2CLIP)
    embedder.json                                        the embedder Φ by name, pooling and length
    embedder/                                            Φ itself, with --copy-embedder
    README.md                                            a model card: lineage and eval metrics

    model = vla.load("exports/proclip")
    img = model.encode_image([PIL.Image...]); txt = model.encode_text(["a long caption ..."])
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vla.artifacts import Artifact, ArtifactBuilder, lineage, open_artifact

KIND = "export"
SOURCES = ("contrast-tune", "pretrain", "train-student")


@dataclass
class ExportRecipe:
    copy_embedder: bool = False


def run(cfg: ExportRecipe, src: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    art = open_artifact(src, SOURCES, role="vla export")
    with ArtifactBuilder(out, KIND, recipe=cfg, inputs={"model": art}, force=force, command=command) as b:
        for f in (art.path / "model").iterdir():
            shutil.copy2(f, b.dir / f.name)
        if art.kind == "contrast-tune":
            for name in ("adapter.safetensors", "adapter.json", "embedder.json"):
                shutil.copy2(art.file(name), b.dir / name)
            if cfg.copy_embedder:
                from vla.models.proclip import embedder_from_spec

                embedder = embedder_from_spec(art.path)
                embedder.model.save_pretrained(b.dir / "embedder", safe_serialization=True)
                embedder.tokenizer.save_pretrained(b.dir / "embedder")
        b.metrics.update(art.manifest.get("metrics", {}).get("eval") or {})
        (b.dir / "README.md").write_text(model_card(art, out, cfg))
    return b.artifact


def model_card(art: Artifact, out: Path, cfg: ExportRecipe) -> str:
    m = art.manifest
    lines = [f"# {out.name}", "",
             f"Exported by vla {m['vla_version']} from `{art.path}` (a `{art.kind}` artifact, digest "
             f"`{art.digest[:16]}`).", "", "## Use", "", "```python", "import vla",
             f"model = vla.load({str(out)!r})",
             "image_emb = model.encode_image([pil_image])      # L2-normalised",
             "text_emb = model.encode_text([\"a caption of any length the embedder reads\"])",
             "```", "",
             "The image tower alone loads with open_clip: "
             f"`open_clip.create_model_and_transforms('local-dir:{out}')`.", ""]
    if art.kind == "contrast-tune":
        spec = json.loads((art.path / "embedder.json").read_text())
        lines += [f"Text side: embedder `{spec.get('name')}` ({spec.get('pooling')} pooling"
                  + (", copied into embedder/" if cfg.copy_embedder else ", named, not copied: it must be available")
                  + ") followed by the adapter in adapter.safetensors.", ""]
    lines += ["## Lineage", ""]
    lines += [f"{'  ' * d}- {role}: `{r.get('kind')}` {r.get('path')}" for d, role, r in lineage(m)]
    evals = m.get("metrics", {}).get("eval") or {}
    if evals:
        lines += ["", "## Evaluation (from the source artifact's manifest)", "", "| set | metric | value |",
                  "|---|---|---|"]
        for set_name, metrics in evals.items():
            for k, v in metrics.items():
                if isinstance(v, float):
                    lines.append(f"| {set_name} | {k} | {v:.4f} |")
    return "\n".join(lines) + "\n"


def load(path: str | Path):
    """Load an export (or a contrast-tune / pretrain artifact) as a model with encode_image,
    encode_text, preprocess and tokenize."""
    from vla.errors import UserError
    from vla.models.clip import load_clip
    from vla.models.proclip import load_proclip_dir

    path = Path(path)
    if not (path / "manifest.json").exists():
        raise UserError(f"{path} is not a vla export (no manifest.json); make one with `vla export SRC --out {path}`")
    art = open_artifact(path, (KIND, *SOURCES), role="vla.load")
    model_dir = path if art.kind == KIND else path / "model"
    if (path / "adapter.json").exists():
        return load_proclip_dir(path, model_dir=model_dir)
    return load_clip("local-dir:" + str(model_dir))
