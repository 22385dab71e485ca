"""`vla train-teacher`: DCLIP's meta-teacher, trained on frozen features.

Story (docs/methods.md §2): a regions table (`vla precompute-regions`: the detector crops' embeddings
from the frozen CLIP image encoder) and the data's captions (read without opening an image; each
epoch, each image trains on one of its captions, drawn anew by (seed, epoch, key)) → the frozen
CLIP text tower, on the training device, gives each batch's token states (strictly between the
start and end tokens) and pooled embedding u → the meta-teacher (`vla.models.dclip.MetaTeacher`:
text→regions and regions→text cross-attention, τ = 2 attention pooling, ½ z_text + ½ z_image,
region weights in the forward pass) trained with

    L = InfoNCE_τ(norm(teacher(x, T)), norm(E_T(T))),   τ = 0.05,   negatives = the global batch

With `image_negatives: M` (vla's variant, off by default; docs/dclip.md) the step also adds
`teacher_image_negatives_loss`: each caption against its own image and the M images after it in
the global batch, all conditioned on it, in one teacher forward over those pairs whose first
column is the InfoNCE's input.

Only the teacher's layers train. Ranks: `train.batch_size` is the global batch (each of N ranks
takes batch_size / N rows of it, and the InfoNCE gathers all of them, as open_clip's ClipLoss);
an optimizer step takes `train.grad_accum` such batches; an epoch is images // (batch_size ·
grad_accum) optimizer steps, the same on any number of ranks, and `train.steps` is
`epochs` × that. Ablation switches: `top_k: 0` feeds the whole image's embedding as the only
region (no regions); `fusion: average` drops both cross-attention layers (the paper's "no
bidirectional attention": each stream τ-pooled from its own inputs, then ½/½) — that teacher has
nothing to train, so the stage only measures its loss over one epoch and writes it for every
epoch. The teacher is saved after every epoch (`teacher/teacher-epochNNN.safetensors`, N counting
whole epochs of optimizer steps): DCLIP's "sweet spot" is a teacher trained 2–3 epochs, not to
convergence, so `train-student --epoch` picks one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from vla.artifacts import Artifact, ArtifactBuilder, claim_out
from vla.data.rows import row_batches
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
    top_k: Optional[int] = None             # most regions per image fed to the teacher (default: all the
                                            # table holds); 0: the whole image alone (the no-regions arm)
    image_negatives: int = 0                # M > 0 adds L_img: each caption scored against its image and M
                                            # other images of the global batch, all conditioned on it
                                            # (`teacher_image_negatives_loss`); 0: the public code's loss
    max_skip_fraction: float = 0.01
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"epochs must be at least 1, not {self.epochs}")
        if self.temperature <= 0 or self.pool_temperature <= 0:
            raise UserError("temperature and pool_temperature must be > 0")
        if self.top_k is not None and self.top_k < 0:
            raise UserError(f"top_k must be 0 or more, not {self.top_k}")
        if not 0 <= self.image_negatives < self.train.batch_size:
            raise UserError(f"image_negatives must be 0 or more and below train.batch_size "
                            f"{self.train.batch_size}, not {self.image_negatives}")


def run(cfg: TrainTeacherRecipe, data: Optional[str], out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    import torch

    from vla.models.dclip.inputs import (TextTower, caption_index, check_keys, check_same_clip, data_of,
                                         global_batch, open_regions, read_caption_lists, steps_per_epoch,
                                         teacher_inputs)
    import torch.nn.functional as F

    from vla.distributed import init_distributed
    from vla.losses import dclip_teacher_loss, teacher_image_negatives_loss
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
    if cfg.top_k is not None and store.top_k is not None and cfg.top_k > store.top_k:
        raise UserError(f"top_k {cfg.top_k} exceeds the {store.top_k} regions per image {regions_art.path} keeps")
    keys, captions, skip_counts = read_caption_lists(td.path, cfg.max_skip_fraction)
    check_keys(store, keys, td.path, regions_art.path)
    dist = init_distributed(cfg.train.device)
    # train.batch_size is the global batch (the InfoNCE's negatives); an epoch counts global steps
    global_batch(cfg.train.batch_size, dist.world_size, "train-teacher")  # refuses unequal shares
    per_epoch = steps_per_epoch(len(keys), cfg.train.batch_size, cfg.train.grad_accum)
    cfg.train.steps = cfg.epochs * per_epoch
    micro_per_epoch = per_epoch * cfg.train.grad_accum

    # the frozen text tower runs on the training device, on each batch's drawn captions
    del clip.model.visual  # the teacher never runs the image tower: its regions are in the table
    text = TextTower.on(clip, dist.device)

    torch.manual_seed(cfg.train.seed)
    teacher = MetaTeacher(TeacherConfig(dim=store.dim, heads=cfg.heads, pool_temperature=cfg.pool_temperature,
                                        fusion=cfg.fusion))
    teacher.train()

    def batches(start_step: int):
        """Micro-batch m of the run: the rows of global batch m (reshuffled every epoch), this
        rank's share, each image with the caption it draws in that epoch."""
        start = start_step * cfg.train.grad_accum
        n_neg, world, rank = cfg.image_negatives, dist.world_size, dist.rank
        for m, global_rows in enumerate(row_batches(len(keys), cfg.train.batch_size, cfg.train.seed, start,
                                                    batches_per_epoch=micro_per_epoch), start):
            epoch = m // micro_per_epoch
            rows = global_rows[rank::world].tolist()  # this rank's share (row_batches' split)
            ks = [keys[i] for i in rows]
            drawn = [captions[i][caption_index(cfg.train.seed, epoch, keys[i], len(captions[i]))] for i in rows]
            batch = {"token_ids": text.tokenize(drawn), "n": len(ks)}
            if n_neg:  # row j (global position g) with the images at g, g+1, .., g+M of the global batch
                n = len(global_rows)  # each image read once, then gathered into its pairs
                images = store.lookup([keys[i] for i in global_rows.tolist()], cfg.top_k)
                pair = (torch.arange(rank, n, world)[:, None] + torch.arange(n_neg + 1)[None, :]) % n
                batch["pairs"] = {k: v[pair.flatten()] for k, v in images.items()}
            else:
                batch.update(store.lookup(ks, cfg.top_k))
            yield batch

    def step(m, b):
        states, mask, pooled = text.states(b["token_ids"])
        if not cfg.image_negatives:
            emb = m(**teacher_inputs(b, states, mask, pooled))
            return {"loss": dclip_teacher_loss(emb, pooled, cfg.temperature, rank=dist.rank,
                                               world_size=dist.world_size)}
        # one forward over (caption j, image) pairs: column 0 is the true pair, the InfoNCE's input
        per = cfg.image_negatives + 1
        out = m(**teacher_inputs(b["pairs"], *(x.repeat_interleave(per, 0) for x in (states, mask, pooled))))
        out = out.view(states.shape[0], per, -1)
        scores = (F.normalize(out, dim=-1) * F.normalize(pooled, dim=-1)[:, None, :]).sum(-1)
        contrast = dclip_teacher_loss(out[:, 0], pooled, cfg.temperature, rank=dist.rank,
                                      world_size=dist.world_size)
        image = teacher_image_negatives_loss(scores, cfg.temperature)
        return {"loss": contrast + image, "infonce": contrast.detach(), "image": image.detach()}

    recipe = {**asdict(cfg), "clip_identity": clip_identity}
    inputs = {**td.inputs, "regions": regions_art, "clip": clip_input}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs=inputs, force=force, command=command) as art:
        teacher_dir = art.dir / TEACHER_DIR

        def save_each_epoch(m, s: int) -> None:
            if s % per_epoch == 0 and dist.rank == 0:  # s counts optimizer steps: epoch = s / per_epoch
                save_teacher(m, teacher_dir, epoch=s // per_epoch)

        if any(p.requires_grad for p in teacher.parameters()):
            result = train(cfg.train, teacher, step, batches, art.dir, after_step=save_each_epoch,
                           samples_per_batch=lambda b: b["n"] * dist.world_size)
        else:  # fusion: average — a fixed function of the frozen features: measure it, save it
            result = _measure_only(teacher.to(dist.device), step, batches(0), micro_per_epoch, dist)
            for epoch in range(1, cfg.epochs + 1):
                if dist.rank == 0:
                    save_teacher(teacher, teacher_dir, epoch=epoch)
        art.extra["trainable_parameters"] = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
        if dist.rank == 0:
            art.counts.update(images=len(keys), steps_per_epoch=per_epoch, data=skip_counts,
                              steps=result.steps, samples=result.samples)
            art.metrics["train"] = result.metrics
            art.timings.update(samples_per_s=result.samples_per_s, train_wall_s=result.wall_s)
            art.extra["epochs"] = list(range(1, cfg.epochs + 1))
            art.extra["device"] = str(dist.device)
    return art.artifact


def _measure_only(teacher, step, batches, micro_batches: int, dist):
    """A teacher with no trainable parameter: its mean loss over one epoch (every rank's share,
    the InfoNCE over the global batch), as a TrainResult."""
    import time

    import torch

    from vla.distributed import all_reduce_mean
    from vla.train import TrainResult, to_device

    start, losses, samples = time.perf_counter(), [], 0
    with torch.no_grad():
        for _, b in zip(range(micro_batches), batches):
            losses.append(step(teacher, to_device(b, dist.device))["loss"].float())
            samples += b["n"] * dist.world_size
    mean = float(all_reduce_mean(torch.stack(losses).mean())) if losses else 0.0
    wall = time.perf_counter() - start
    return TrainResult(steps=0, samples=samples, wall_s=wall, samples_per_s=samples / wall if wall > 0 else 0.0,
                       metrics={"loss": mean})
