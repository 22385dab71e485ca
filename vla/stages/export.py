"""`vla export`: a model directory a user can take away (`vla.load` reads it: vla/models/load.py).

Layout (also an artifact, kind "export", so `vla eval` and `vla inspect` accept it):

    open_clip_config.json, open_clip_model.safetensors   the CLIP whose image tower was tuned, in
                                                         open_clip's own layout:
                                                         open_clip.create_model_and_transforms("local-dir:DIR")
    adapter.safetensors, adapter.json                    the adapter g (ProCLIP / LLM2CLIP)
    embedder.json                                        the embedder Φ by name, pooling and length
    embedder/                                            Φ itself, with --copy-embedder
    README.md                                            a model card (Hugging Face metadata header,
                                                         intended use, data, metrics, lineage)

An MM-GEM export (from joint-train or stage2-roi) is `save_mmgem`'s layout instead:

    lm/                                                  the causal LM and its tokenizer, transformers'
                                                         layout (AutoModelForCausalLM.from_pretrained),
                                                         [EMB], [CAP] and the soft prompts included
    mmgem.safetensors, mmgem.json                        the vision tower, h1-h4, τ; config and token ids
    README.md                                            its model card

The text tower inside open_clip_model.safetensors is the teacher's, untouched by contrast-tune:
only the image tower is meant for open_clip; the text side is Φ + g, through `vla.load`.

    model = vla.load("exports/proclip")
    img = model.encode_image(pil_image); txt = model.encode_text("a long caption ...")
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, lineage, open_artifact

KIND = "export"
#: MM-GEM stages: their `model/` is `save_mmgem`'s (mmgem.json, mmgem.safetensors, lm/)
MMGEM_SOURCES = ("joint-train", "stage2-roi")
SOURCES = ("contrast-tune", "pretrain", "train-student", *MMGEM_SOURCES)
# the metrics a card shows per eval set, in this order (all of CLIP_benchmark's names)
CARD_METRICS = ("mean_recall", "image_retrieval_recall@1", "text_retrieval_recall@1", "acc1", "acc5",
                "mean_per_class_recall")


@dataclass
class ExportRecipe:
    copy_embedder: bool = False


def run(cfg: ExportRecipe, src: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    claim_out(out, force=force, inputs={"model": src})
    art = open_artifact(src, SOURCES, role="vla export")
    _refuse_tower_variants(art)
    if art.kind in MMGEM_SOURCES:
        check_mmgem_source(art)
    with ArtifactBuilder(out, KIND, recipe=cfg, inputs={"model": art}, force=force, command=command) as b:
        for f in (art.path / "model").iterdir():
            if f.is_dir():  # MM-GEM's lm/: the LM and its tokenizer in transformers' layout
                shutil.copytree(f, b.dir / f.name)
            else:
                shutil.copy2(f, b.dir / f.name)
        if art.kind == "contrast-tune":
            for name in ("adapter.safetensors", "adapter.json", "embedder.json"):
                shutil.copy2(art.file(name), b.dir / name)
            if cfg.copy_embedder:
                from vla.models.proclip import embedder_from_spec

                embedder = embedder_from_spec(art.path)
                embedder.model.save_pretrained(b.dir / "embedder", safe_serialization=True)
                embedder.tokenizer.save_pretrained(b.dir / "embedder")
        for f in b.dir.rglob("*"):  # copies keep their source's mode; an export is for sharing
            f.chmod(0o755 if f.is_dir() else 0o644)
        b.metrics.update(art.manifest.get("metrics", {}).get("eval") or {})
        card = mmgem_card(art, out) if art.kind in MMGEM_SOURCES else model_card(art, out, cfg)
        (b.dir / "README.md").write_text(card)
    return b.artifact


def _refuse_tower_variants(art: Artifact) -> None:
    """A student trained with 2-D RoPE or cluster pooling cannot be an open_clip model: open_clip
    would load its weights without them (absolute positions at zero, class-token pooling) and
    compute other embeddings without a word. vla loads it (`vla eval`, `vla.load` on the artifact)."""
    from vla.errors import UserError
    from vla.models.dclip.vision_variants import read_variant

    variant = read_variant(art.path / "model")
    if variant is not None and variant.active:
        raise UserError(f"{art.path} has {variant.describe()} in its image tower, which open_clip's layout cannot "
                        f"represent; use the artifact itself (`vla eval {art.path}`, `vla.load`), or train the "
                        f"student with rope_2d: false and clusters: 0 to export it")


def check_mmgem_source(art: Artifact) -> None:
    """Refuse, before anything is written, an MM-GEM artifact whose LM tokenizer lacks a special
    token ([EMB], [CAP], the soft prompts) its manifest recorded: the export would load into a
    model that embeds or captions with the wrong rows."""
    from transformers import AutoTokenizer

    from vla.errors import UserError
    from vla.models.mmgem.causal_lm import check_mode_tokens
    from vla.models.mmgem import CONFIG_FILE, LM_DIR

    model_dir = art.path / "model"
    if not (model_dir / CONFIG_FILE).is_file() or not (model_dir / LM_DIR).is_dir():
        raise UserError(f"{model_dir}: no {CONFIG_FILE} and {LM_DIR}/ (save_mmgem's layout); the artifact is "
                        f"damaged, rebuild it with `vla {art.kind} ... --force`")
    recorded = dict((art.manifest.get("mmgem") or {}).get("tokens") or json.loads(
        (model_dir / CONFIG_FILE).read_text())["tokens"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir / LM_DIR, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{model_dir / LM_DIR}: cannot load its tokenizer ({str(err).splitlines()[0]}); "
                        f"rebuild the artifact with `vla {art.kind} ... --force`") from err
    check_mode_tokens(tokenizer, recorded, str(model_dir / LM_DIR))


def mmgem_card(art: Artifact, out: Path) -> str:
    """The model card of an MM-GEM export: what each file is, how to embed and caption with it,
    and the LM alone through transformers."""
    from vla.models.mmgem import CONFIG_FILE

    m = art.manifest
    name = out.name
    meta = json.loads((art.path / "model" / CONFIG_FILE).read_text())
    tokens = meta["tokens"]
    n_soft = meta["config"].get("soft_prompts", 0)
    record = m.get("mmgem") or {}
    lm = (record.get("lm") or {}).get("name") or "its stage-1 artifact's LM"  # stage2-roi records no LM of its own
    lines = ["---", "library_name: vla", "tags:", "- vla", "- mmgem", "- image-text-retrieval", "- image-captioning",
             "- transformers", "pipeline_tag: image-to-text", "---", "", f"# {name}", "",
             f"MM-GEM (arXiv 2405.19333) from a `{art.kind}` artifact: one open_clip ViT image tower and one "
             f"causal LM ({lm}) that both embeds (`[EMB]`) and captions (`[CAP]`"
             + (f"; regions with the {n_soft} soft prompts `[CAP_1]`…`[CAP_{n_soft}]`" if n_soft else "") + ").", "",
             "## Files", "",
             "- `lm/`: the causal LM and its tokenizer in transformers' layout (`save_pretrained`, safetensors), "
             "with the special tokens below in the tokenizer and in the embedding table"
             + (" (the trained soft prompts are their rows)" if n_soft else "") + ";",
             "- `mmgem.safetensors`: the vision tower and the heads h1 (image), h2 (text), h3 (visual prefix), "
             "h4 (regions) and the temperature;",
             f"- `{CONFIG_FILE}`: the model's configuration, the tower's open_clip config and the special tokens' ids.",
             "", "| token | id |", "|---|---:|"]
    lines += [f"| `{t}` | {i} |" for t, i in tokens.items()]
    lines += ["", "## Use", "", "```python", "import vla", "",
              f"model = vla.load(\"{name}\")                        # the path of this folder",
              "image_emb = model.encode_image([pil_image])            # (N, D), L2-normalised",
              "text_emb = model.encode_text([\"a caption, long or short\"])",
              "region_emb = model.encode_regions([pil_image], [boxes])  # boxes (K, 4) in the image's own pixels",
              "captions = model.caption([pil_image])                  # greedy, KV cache"
              + ("; boxes=[boxes] captions regions" if n_soft else ""),
              "```", "", "The LM alone, with transformers:", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"lm = AutoModelForCausalLM.from_pretrained(\"{name}/lm\")",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{name}/lm\")", "```", "",
              "Its text embedding is `h2` of the last hidden state at `[EMB]` and its captions start from "
              "`[V_in, [CAP]]`: both need the heads in `mmgem.safetensors`, so use `vla.load` for them.", "",
              "Region boxes are x1, y1, x2, y2 in each image's own pixels (as COCO and detectors give them); "
              "the model maps them through the tower's resize and centre crop itself, and refuses a box that "
              "is empty, outside its image or cropped away. `box_frame=\"input\"` takes boxes in the tower's "
              "input pixels instead.", ""]
    lines += _card_tail(art, name, "Research on image-text alignment and captioning: embedding images, regions "
                        "and texts into one space for retrieval, and captioning images and regions.")
    return "\n".join(lines) + "\n"


def _card_tail(art: Artifact, name: str, purpose: str) -> list[str]:
    """The sections every model card ends with: intended use, data, metrics, lineage, upload."""
    m = art.manifest
    lines = ["## Intended use", "",
             f"{purpose} It is not evaluated for any deployed use, for safety-critical decisions or for "
             "people; its behaviour outside the data below is unknown.", ""]
    lines += _data_section(m) + _metrics_section(m) + ["## Lineage", ""]
    lines += [f"{'  ' * d}- {role}: `{r.get('kind')}` {r.get('path')} (digest `{str(r.get('digest', ''))[:12]}`)"
              for d, role, r in lineage(m)]
    lines += ["", f"Exported by vla {m['vla_version']} from a `{art.kind}` artifact (digest `{art.digest[:16]}`).",
              "", "## Upload", "", "```python", "from huggingface_hub import HfApi", "",
              f"HfApi().upload_folder(folder_path=\"{name}\", repo_id=\"YOUR-NAME/{name}\", repo_type=\"model\")",
              "```"]
    return lines


def model_card(art: Artifact, out: Path, cfg: ExportRecipe) -> str:
    """The export's README.md: a Hugging Face model card. Paths in it are relative to the folder
    (or name it), so the card stays true wherever the folder is copied or uploaded."""
    proclip = art.kind == "contrast-tune"
    spec = json.loads((art.path / "embedder.json").read_text()) if proclip else {}
    name = out.name
    tags = ["vla", "clip", "image-text-retrieval"] + (["proclip", "llm2clip"] if proclip else ["open_clip"])
    lines = ["---", f"library_name: {'vla' if proclip else 'open_clip'}", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["pipeline_tag: zero-shot-image-classification", "---", "", f"# {name}", ""]
    if proclip:
        lines += _OPEN_CLIP_WARNING.format(ctx=_text_context(art)).splitlines() + [""]
    lines += ["## Use", "", "```python", "import vla", "",
              f"model = vla.load(\"{name}\")                 # the path of this folder",
              "image_emb = model.encode_image(pil_image)       # (1, D), L2-normalised; a list gives (N, D)",
              "text_emb = model.encode_text(\"a caption of any length the embedder reads\")",
              "scores = image_emb @ text_emb.T", "```", ""]
    if proclip:
        lines += ["The image tower alone, with open_clip:", "", "```python", "import open_clip", "",
                  f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{name}\")",
                  "image_emb = model.encode_image(preprocess(pil_image).unsqueeze(0), normalize=True)",
                  "```", "",
                  f"Text side: the embedder `{spec.get('name')}` ({spec.get('pooling')} pooling, up to "
                  f"{spec.get('max_length')} tokens"
                  + (", copied into `embedder/`" if cfg.copy_embedder
                     else "; named, not copied: `vla.load` needs it on disk, or re-export with --copy-embedder")
                  + "), then the adapter in `adapter.safetensors`.", ""]
    else:
        lines += [f"It is a plain open_clip model: `open_clip.create_model_and_transforms(\"local-dir:{name}\")`.", ""]
    lines += _card_tail(art, name, "Research on image-text alignment: embedding images and texts into one space "
                        "for retrieval and zero-shot classification, and comparing alignment methods.")
    if proclip and not cfg.copy_embedder:
        lines += ["", "Export with `--copy-embedder` first if the embedder is not on the hub."]
    return "\n".join(lines) + "\n"


_OPEN_CLIP_WARNING = """\
> **⚠ Only the image tower is meant for open_clip.** open_clip also loads a text tower from this
> folder, without a warning: the original CLIP's text encoder, which this model's training did
> not use and which cuts every text at {ctx} tokens. Texts embedded through it are not this
> model's text side. Load the model with `vla.load` for text."""


def _text_context(art: Artifact) -> str:
    try:
        cfg = json.loads((art.path / "model" / "open_clip_config.json").read_text())["model_cfg"]
        return str(cfg["text_cfg"].get("context_length", 77))
    except (OSError, KeyError, ValueError):
        return "77"


def _data_section(m: dict) -> list[str]:
    """What the model was trained on: every data input in its lineage, with the source's counts."""
    data = list({(r.get("path"), r.get("digest")): r for _, role, r in lineage(m) if role == "data"}.values())
    lines = ["## Training data", ""]
    for r in data:
        kind = r.get("kind")
        what = ("vla's generated synthetic world (coloured shapes; not natural images)" if kind == "synth"
                else "image-text pairs")
        lines.append(f"- `{r.get('path')}`: {what} (digest `{str(r.get('digest', ''))[:12]}`)")
    train = (m.get("counts") or {}).get("train") or {}
    if train:
        lines.append(f"- last stage: {train.get('steps')} steps, {train.get('samples')} samples seen, "
                     f"{sum((train.get('skipped') or {}).values())} skipped as corrupt")
    return lines + [""] if data or train else lines + ["Not recorded.", ""]


def _metrics_section(m: dict) -> list[str]:
    evals = (m.get("metrics") or {}).get("eval") or {}
    if not evals:
        return []
    shown = [k for k in CARD_METRICS if any(k in v for v in evals.values())]
    lines = ["## Evaluation", "",
             "Scored by the source stage on its evaluation sets, as CLIP_benchmark computes them (×100):", "",
             "| set | " + " | ".join(shown) + " |", "|---|" + "---:|" * len(shown)]
    for set_name, metrics in evals.items():
        cells = [f"{100 * metrics[k]:.1f}" if isinstance(metrics.get(k), float) else "" for k in shown]
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return lines + [""]
