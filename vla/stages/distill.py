"""`vla distill`: ProCLIP stage 1 — distil a CLIP text encoder into an LLM embedder + adapter.

Story (METHODS.md §1): captions of the data → the frozen embedder Φ and the frozen CLIP text
encoder E_T, both through the feature cache (each is computed once per model and data) → the
adapter g trained with

    L_dis = L_ins(short) + L_ins(second text) + L_struct(short)
    s_i = norm(g(Φ(T_i))),  u_i = norm(E_T(T_i))   (the teacher sees at most its own context)

→ the adapter in safetensors, the embedder named, and in the manifest how many captions the
teacher truncated and how closely the student follows it on held-out captions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from vla.artifacts import Artifact, ArtifactBuilder
from vla.data.rows import row_batches
from vla.stages.common import training_data
from vla.train import TrainConfig, train

KIND = "distill"


@dataclass
class EmbedderConfig:
    name: str = "qwen"                      # registry alias, hub id or local path
    pooling: Optional[str] = None           # mean | last | cls | token:<tok>; default: the alias's
    instruction: Optional[str] = None       # prefix for queries (Qwen3-Embedding style)
    max_length: int = 512                   # tokens the embedder reads (long captions fit)
    batch_size: int = 64                    # for computing the cached features


@dataclass
class DistillRecipe:
    teacher: str = "clip-vit-l"             # the CLIP whose text encoder is distilled
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    adapter: Literal["proclip", "llm2clip"] = "proclip"   # 1 block ×8, or 4 blocks ×2
    adapter_dropout: float = 0.0
    # the second text variant for L_ins: the long caption (ProCLIP's official code uses a second,
    # perturbed text), a second short caption, or none
    second_text: Literal["long_caption", "caption", "none"] = "long_caption"
    max_skip_fraction: float = 0.01
    val_rows: int = 1000                    # held-out captions for the agreement metrics
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class CaptionTable:
    keys: list[str]
    short: list[str]                 # each sample's first caption
    second: list[str] | None         # the second text variant, if any
    second_field: str = ""           # what the second variant is: "long_caption" or "caption2"


def read_captions(path: Path, second: str, max_skip_fraction: float) -> tuple[CaptionTable, dict]:
    """Every sample's captions, without decoding images (distillation is text only)."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    skips = SkipCounter()
    keys, short, other = [], [], []
    for s in resolve_data(path).iter_samples(skips, decode=False):
        keys.append(s.key)
        short.append(s.captions[0])
        if second == "long_caption":
            other.append(s.long_caption or s.captions[0])
        elif second == "caption":
            other.append(s.captions[1] if len(s.captions) > 1 else s.captions[0])
    skips.check(max_skip_fraction, str(path))
    column = {"long_caption": "long_caption", "caption": "caption2"}.get(second, "")
    return CaptionTable(keys, short, other if second != "none" else None, column), skips.as_dict()


def model_identity(ref: str) -> str:
    """What a cache key calls a model: an artifact's content digest, else its name."""
    if (Path(ref) / "manifest.json").exists():
        return json.loads((Path(ref) / "manifest.json").read_text())["digest"]
    return ref


def load_teacher(ref: str):
    from vla.models.load import load_encoder

    return load_encoder(ref)


def frozen_text_features(data_dir: Path, data_digest: str, table: CaptionTable, teacher, teacher_id: str,
                         embedder, batch_size: int) -> dict[str, torch.Tensor]:
    """Φ(T) and E_T(T) for both text variants, from the cache (computed on a miss)."""
    from vla.cache import cached_features

    out = {}
    variants = {"short": ("caption", table.short)}
    if table.second is not None:
        variants["second"] = (table.second_field, table.second)
    for variant, (column, texts) in variants.items():
        for role, ident, encode in (("phi", embedder.digest(), embedder.embed),
                                    ("teacher", teacher_id, teacher.encode_text)):
            tab, _hit = cached_features(data_dir, f"{role}.{column}", model_digest=ident, data_digest=data_digest,
                                        keys=table.keys, inputs=texts, encode=encode, batch_size=batch_size)
            out[f"{role}.{variant}"] = torch.from_numpy(tab.features[:].astype("float32"))
    return out


def run(cfg: DistillRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.data.stream import resolve_data
    from vla.distributed import init_distributed
    from vla.losses import distill_loss
    from vla.models.adapter import Adapter, AdapterConfig
    from vla.models.embedder import load_embedder
    from vla.models.proclip import save_adapter

    td = training_data(data)
    teacher = load_teacher(cfg.teacher)
    embedder = load_embedder(cfg.embedder.name, pooling=cfg.embedder.pooling,
                             instruction=cfg.embedder.instruction, max_length=cfg.embedder.max_length)
    dist = init_distributed()
    table, skip_counts = read_captions(td.path, cfg.second_text, cfg.max_skip_fraction)
    teacher_id = model_identity(cfg.teacher)
    feats = frozen_text_features(td.path, resolve_data(td.path).digest(), table, teacher, teacher_id,
                                 embedder, cfg.embedder.batch_size)

    # hold out the last rows for the agreement metrics (shards are already in random order)
    n_val = min(cfg.val_rows, len(table.keys) // 5)
    n_train = len(table.keys) - n_val
    preset = getattr(AdapterConfig, cfg.adapter)
    torch.manual_seed(cfg.train.seed)
    adapter = Adapter.from_config(preset(embedder.dim, feats["teacher.short"].shape[1], dropout=cfg.adapter_dropout))
    two = "phi.second" in feats

    def batches(start_step: int):
        for rows in row_batches(n_train, cfg.train.batch_size, cfg.train.seed, start_step * cfg.train.grad_accum,
                                dist.world_size, dist.rank):
            yield {k: v[rows] for k, v in feats.items()}

    def step(model, b):
        s = F.normalize(model(b["phi.short"]), dim=-1)
        s2 = F.normalize(model(b["phi.second"]), dim=-1) if two else None
        return distill_loss(s, b["teacher.short"], s2, b.get("teacher.second"))

    recipe = {**asdict(cfg), "teacher_identity": teacher_id}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs=_inputs(td, cfg.teacher), force=force,
                         command=command) as art:
        result = train(cfg.train, adapter, step, batches, art.dir,
                       samples_per_batch=lambda b: b["phi.short"].shape[0] * dist.world_size)
        if dist.rank == 0:
            save_adapter(adapter, art.dir)
            (art.dir / "embedder.json").write_text(json.dumps(embedder.spec, indent=1))
            (art.dir / "teacher.json").write_text(json.dumps({"teacher": cfg.teacher, "identity": teacher_id}))
            counts = teacher.text_token_counts(table.short)
            art.counts.update(captions=len(table.keys), train_rows=n_train, val_rows=n_val, data=skip_counts)
            ctx = teacher.text_context_length
            art.counts["teacher_truncated"] = {
                "context_length": ctx,
                "short": sum(c > ctx for c in counts) if ctx else 0,
                **({"second": sum(c > ctx for c in teacher.text_token_counts(table.second))}
                   if table.second is not None and ctx else {})}
            art.metrics["train"] = result.metrics
            art.metrics["val"] = agreement(adapter, feats, slice(n_train, None))
            art.timings.update(samples_per_s=result.samples_per_s, train_wall_s=result.wall_s)
    return art.artifact


def _inputs(td, teacher: str) -> dict:
    from vla.artifacts import open_artifact

    inputs = dict(td.inputs)
    if (Path(teacher) / "manifest.json").exists():
        inputs["teacher"] = open_artifact(teacher)
    else:
        inputs["teacher"] = {"path": teacher, "kind": "model"}
    return inputs


@torch.no_grad()
def agreement(adapter, feats: dict[str, torch.Tensor], rows: slice) -> dict[str, float]:
    """How well the student follows the teacher on held-out captions: mean cosine, and how often
    a student embedding's nearest teacher embedding is its own caption's (top-1 agreement)."""
    adapter.eval()
    s = F.normalize(adapter(feats["phi.short"][rows]), dim=-1)
    u = feats["teacher.short"][rows]
    sims = s @ u.T
    own = sims.diagonal()
    # pessimistic on ties: a caption whose teacher embedding duplicates another's counts as a miss
    top1 = (sims >= own[:, None]).sum(1).eq(1).float().mean().item()
    return {"cosine": own.mean().item(), "top1_agreement": top1, "rows": int(s.shape[0])}
