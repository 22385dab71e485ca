"""`vla train-teacher`: DCLIP's meta-teacher, trained on cached frozen features only.

Story (docs/methods.md §2): a regions table (`vla precompute-regions`: region and global embeddings
from the frozen CLIP image encoder) and the data's captions (one per image, fixed by the seed) →
the frozen CLIP text encoder's token states and pooled embedding, computed once into the feature
cache → the meta-teacher (`vla.models.dclip.MetaTeacher`: text→regions and regions→text
cross-attention, τ = 2 attention pooling, ½ z_text + ½ z_image, region weights in the forward
pass) trained with

    L = InfoNCE_τ(norm(teacher(x, T)), norm(E_T(T))),   τ = 0.05

Only the teacher's layers train; an epoch reads cached rows and never runs a CLIP tower. Ablation
switches: `top_k: 0` feeds the global image embedding only (no regions); `fusion: average` drops
both cross-attention layers (the paper's "no bidirectional attention": each stream τ-pooled from
its own inputs, then ½/½) — that teacher has nothing to train, so the stage only measures its loss
over one epoch and writes it for every epoch. The
teacher is saved after every epoch (`teacher/teacher-epochNNN.safetensors`): DCLIP's "sweet
spot" is a teacher trained 2–3 epochs, not to convergence, so `train-student --epoch` picks one.
`train.steps` is derived from `epochs` (epochs × images // batch size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from vla.artifacts import Artifact, ArtifactBuilder, claim_out
from vla.errors import UserError
from vla.train import TrainConfig

KIND = "train-teacher"
TEACHER_DIR = "teacher"


@dataclass
class TrainTeacherRecipe:
    regions: str = ""                       # a precompute-regions artifact
    clip: Optional[str] = None              # the frozen CLIP; default: the one the regions table was built with
    epochs: int = 3
    heads: int = 4
    fusion: Literal["bidirectional", "average"] = "bidirectional"   # average: the no-attention ablation
    pool_temperature: float = 2.0           # τ of the attention pooling
    temperature: float = 0.05               # τ of the InfoNCE
    top_k: Optional[int] = None             # regions per image fed to the teacher (≤ the table's); 0: global only
    text_batch_size: int = 256              # captions per text-tower forward when filling the cache
    max_skip_fraction: float = 0.01
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"epochs must be at least 1, not {self.epochs}")
        if self.temperature <= 0 or self.pool_temperature <= 0:
            raise UserError("temperature and pool_temperature must be > 0")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be 0 or more, not {self.top_k}")


def run(cfg: TrainTeacherRecipe, data: Optional[str], out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.data.rows import row_batches
    from vla.data.stream import resolve_data
    from vla.data.teacher_inputs import (cached_text_states, check_keys, check_same_clip, data_of, open_regions,
                                         read_drawn_captions, teacher_inputs)
    from vla.distributed import init_distributed
    from vla.losses import dclip_teacher_loss
    from vla.models.dclip import MetaTeacher, TeacherConfig, load_dclip_clip, save_teacher
    from vla.stages.common import training_data
    from vla.train import train

    # inputs, all checked before any compute
    claim_out(out, force=force, inputs={"regions": cfg.regions, "clip": cfg.clip, "data": data})
    regions_art, store = open_regions(cfg.regions)
    clip_ref = cfg.clip or regions_art.manifest["inputs"]["clip"]["path"]
    clip, clip_input, clip_identity = load_dclip_clip(clip_ref)
    check_same_clip(store, clip_identity, clip_ref, regions_art.path)
    td = training_data(data or data_of(regions_art), split=regions_art.recipe.get("split", "train"))
    if cfg.top_k is not None and cfg.top_k > store.top_k:
        raise UserError(f"top_k {cfg.top_k} exceeds the {store.top_k} regions per image {regions_art.path} keeps")
    keys, texts, skip_counts = read_drawn_captions(td.path, cfg.train.seed, cfg.max_skip_fraction)
    check_keys(store, keys, td.path, regions_art.path)
    steps_per_epoch = len(keys) // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise UserError(f"{len(keys)} images make no batch of train.batch_size={cfg.train.batch_size}; lower it")
    cfg.train.steps = cfg.epochs * steps_per_epoch
    dist = init_distributed(cfg.train.device)

    # the frozen text tower's outputs: once, into the feature cache
    text = cached_text_states(clip, clip_identity, td.path, resolve_data(td.path).digest(), keys, texts,
                              cfg.text_batch_size)
    del clip  # nothing below runs a CLIP tower

    import torch

    torch.manual_seed(cfg.train.seed)
    teacher = MetaTeacher(TeacherConfig(dim=store.dim, heads=cfg.heads, pool_temperature=cfg.pool_temperature,
                                        fusion=cfg.fusion))
    teacher.train()

    def batches(start_step: int):
        for rows in row_batches(len(keys), cfg.train.batch_size, cfg.train.seed, start_step * cfg.train.grad_accum,
                                dist.world_size, dist.rank):
            yield teacher_inputs(store, text, [keys[i] for i in rows.tolist()], cfg.top_k)

    def step(m, b):
        emb = m(b["tokens"], b["token_mask"], b["text"], b["regions"], b["region_mask"], b["conf"], b["area"])
        return {"loss": dclip_teacher_loss(emb, b["text"], cfg.temperature)}

    recipe = {**asdict(cfg), "clip_identity": clip_identity}
    inputs = {**td.inputs, "regions": regions_art, "clip": clip_input}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs=inputs, force=force, command=command) as art:
        teacher_dir = art.dir / TEACHER_DIR

        def save_each_epoch(m, s: int) -> None:
            if s % steps_per_epoch == 0 and dist.rank == 0:
                save_teacher(m, teacher_dir, epoch=s // steps_per_epoch)

        if any(p.requires_grad for p in teacher.parameters()):
            result = train(cfg.train, teacher, step, batches, art.dir, after_step=save_each_epoch,
                           samples_per_batch=lambda b: b["tokens"].shape[0] * dist.world_size)
        else:  # fusion: average — a fixed function of the frozen features: measure it, save it
            result = _measure_only(teacher, step, batches(0), steps_per_epoch)
            for epoch in range(1, cfg.epochs + 1):
                if dist.rank == 0:
                    save_teacher(teacher, teacher_dir, epoch=epoch)
        art.extra["trainable_parameters"] = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
        if dist.rank == 0:
            art.counts.update(images=len(keys), steps_per_epoch=steps_per_epoch, data=skip_counts,
                              steps=result.steps, samples=result.samples)
            art.metrics["train"] = result.metrics
            art.timings.update(samples_per_s=result.samples_per_s, train_wall_s=result.wall_s)
            art.extra["epochs"] = list(range(1, cfg.epochs + 1))
    return art.artifact


def _measure_only(teacher, step, batches, steps: int):
    """A teacher with no trainable parameter: its mean loss over one epoch, as a TrainResult."""
    import time

    import torch

    from vla.train import TrainResult

    start, losses, samples = time.perf_counter(), [], 0
    with torch.no_grad():
        for _, b in zip(range(steps), batches):
            losses.append(float(step(teacher, b)["loss"]))
            samples += b["tokens"].shape[0]
    wall = time.perf_counter() - start
    return TrainResult(steps=0, samples=samples, wall_s=wall, samples_per_s=samples / wall if wall > 0 else 0.0,
                       metrics={"loss": sum(losses) / max(len(losses), 1)})
