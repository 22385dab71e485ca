"""`vla distill`: ProCLIP stage 1 — distil a CLIP text encoder into an LLM embedder + adapter.

Story (docs/methods.md §1): captions of the data → the frozen embedder Φ and the frozen CLIP text
encoder E_T, both through the feature cache (each is computed once per model and data) → the
adapter g trained with

    L_dis = L_ins(short) + L_ins(second text) + L_struct(short)
    s_i = norm(g(Φ(T_i))),  u_i = norm(E_T(T_i))   (the teacher sees at most its own context)

(the sums of L_ins and L_struct run over the global batch at any number of ranks: `vla.losses`)

→ the adapter in safetensors, the embedder named, and in the manifest how many captions the
teacher and the embedder truncated and how closely the student follows it on held-out captions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import torch
import torch.nn.functional as F

from vla.artifacts import Artifact, ArtifactBuilder, claim_out
from vla.errors import UserError
from vla.data.captions import Captions, Rows, read_captions, text_windows
from vla.models.embedder import EmbedderConfig
from vla.models.load import model_identity
from vla.data.rows import row_batches
from vla.stages.common import training_data
from vla.train import TrainConfig, train

if TYPE_CHECKING:
    from vla.cache import FeatureTable

KIND = "distill"


@dataclass
class DistillRecipe:
    teacher: str = "clip-vit-l"             # the CLIP whose text encoder is distilled
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    adapter: Literal["proclip", "llm2clip"] = "proclip"   # 1 block ×8, or 4 blocks ×2
    adapter_dropout: float = 0.0
    # the second text variant for L_ins: a second short caption (ProCLIP's official code uses a
    # second, perturbed short text; a sample with one caption repeats it), the long caption (which
    # pulls Φ(long) toward the teacher's embedding of its truncated preamble: docs/world.md), or none
    second_text: Literal["long_caption", "caption", "none"] = "caption"
    max_skip_fraction: float = 0.01
    val_rows: int = 1000                    # held-out captions for the agreement metrics
    train: TrainConfig = field(default_factory=TrainConfig)


def load_teacher(ref: str, device):
    from vla.models.load import load_encoder

    return load_encoder(ref, device=device)


def text_variants(captions: Captions, second: str) -> dict[str, tuple[str, Rows]]:
    """{variant: (cache column, rows: one per sample)}: the short caption, and the second text if any.
    The rows are streams, read from the data again each time (nothing holds the texts)."""
    variants = {"short": ("caption", captions.short)}
    if second != "none":
        variants["second"] = captions.variant(second)
    return variants


def frozen_text_features(data_digest: str, variants: dict[str, tuple[str, Rows]], teacher, teacher_id: str,
                         embedder, batch_size: int, device=None) -> dict[str, "FeatureTable"]:
    """Φ(T) and E_T(T) for every text variant, from the cache (computed on `device` on a miss),
    as memory-mapped tables whose row i is sample i's."""
    from vla.cache import cached_features

    out = {}
    teacher_model = getattr(teacher, "model", None)
    for variant, (column, rows) in variants.items():
        for role, ident, encode, model in (("phi", embedder.digest(), embedder.embed, embedder.model),
                                           ("teacher", teacher_id, teacher.encode_text, teacher_model)):
            out[f"{role}.{variant}"], _hit = cached_features(
                f"{role}.{column}", rows, model_identity=ident,
                data_digest=data_digest, encode=encode, batch_size=batch_size, model=model, device=device)
    return out


def run(cfg: DistillRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.distributed import init_distributed
    from vla.losses import distill_loss
    from vla.models.proclip.adapter import Adapter, AdapterConfig
    from vla.models.embedder import embedder_from_config
    from vla.models.proclip import save_adapter

    claim_out(out, force=force, inputs={"data": data, "teacher": cfg.teacher, "embedder": cfg.embedder.name})
    td = training_data(data)
    dist = init_distributed(cfg.train.device)  # the one place the device is decided
    teacher = load_teacher(cfg.teacher, dist.device)
    embedder = embedder_from_config(cfg.embedder, device=dist.device)
    captions, skip_counts = read_captions(td.path, cfg.max_skip_fraction)
    variants = text_variants(captions, cfg.second_text)
    # hold out the last rows for the agreement metrics (shards are already in random order)
    n_val = min(cfg.val_rows, captions.count // 5)
    n_train = captions.count - n_val
    row_batches(n_train, cfg.train.batch_size, 0, 0)  # refuse a batch larger than the data now
    teacher_id = model_identity(cfg.teacher)
    feats = frozen_text_features(captions.source.digest(), variants, teacher, teacher_id,
                                 embedder, cfg.embedder.batch_size, dist.device)
    if any(len(t) != captions.count for t in feats.values()):  # rows are found by index: they must agree
        raise UserError(f"{td.path} changed while its captions were read; rerun when it no longer changes")

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
        return distill_loss(s, b["teacher.short"], s2, b.get("teacher.second"), rank=dist.rank,
                            world_size=dist.world_size)

    recipe = {**asdict(cfg), "teacher_identity": teacher_id}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs=_inputs(td, cfg.teacher), force=force,
                         command=command) as art:
        result = train(cfg.train, adapter, step, batches, art.dir,
                       samples_per_batch=lambda b: b["phi.short"].shape[0] * dist.world_size)
        if dist.rank == 0:
            save_adapter(adapter, art.dir)
            (art.dir / "embedder.json").write_text(json.dumps(embedder.spec, indent=1))
            (art.dir / "teacher.json").write_text(json.dumps({"teacher": cfg.teacher, "identity": teacher_id}))
            art.counts.update(captions=captions.count, train_rows=n_train, val_rows=n_val, data=skip_counts)
            art.counts.update(truncation(variants, teacher, embedder))
            art.metrics["train"] = result.metrics
            art.metrics["val"] = agreement(adapter, feats, slice(n_train, None))
            art.extra["device"] = str(dist.device)
            art.timings.update(samples_per_s=result.samples_per_s, train_wall_s=result.wall_s)
    return art.artifact


def truncation(variants: dict[str, tuple[str, Rows]], teacher, embedder) -> dict[str, dict]:
    """How many captions of each variant the teacher (at its text context) and the embedder (at
    its max_length) cut short: what they encoded is each caption's beginning only. The texts are
    streamed and tokenized a window at a time."""
    ctx = teacher.text_context_length
    by_teacher, by_embedder = {}, {}
    for variant, (_, rows) in variants.items():
        by_teacher[variant] = by_embedder[variant] = 0
        for window in text_windows(rows):
            if ctx:
                by_teacher[variant] += sum(c > ctx for c in teacher.text_token_counts(window))
            by_embedder[variant] += embedder.truncated(window)
    return {"teacher_truncated": {"context_length": ctx, **by_teacher},
            "embedder_truncated": {"max_length": embedder.max_length, **by_embedder}}


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
    cosine, top1, n = agreement_tensors(adapter, feats, rows)
    return {"cosine": cosine.item(), "top1_agreement": top1.item(), "rows": n}


def agreement_tensors(adapter, feats: dict[str, torch.Tensor], rows: slice):
    """(mean cosine, top-1 agreement, rows) computed on the adapter's device, wherever the
    features are (they stay on the CPU; the adapter may have trained on a GPU)."""
    adapter.eval()
    device = next(adapter.parameters()).device
    s = F.normalize(adapter(feats["phi.short"][rows].to(device)), dim=-1)
    u = feats["teacher.short"][rows].to(device)
    sims = s @ u.T
    own = sims.diagonal()
    # pessimistic on ties: a caption whose teacher embedding duplicates another's counts as a miss
    top1 = (sims >= own[:, None]).sum(1).eq(1).float().mean()
    return own.mean(), top1, int(s.shape[0])
