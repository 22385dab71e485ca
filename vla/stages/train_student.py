"""`vla train-student`: DCLIP's student — the CLIP image tower distilled from the meta-teacher.

Story (docs/methods.md §2): a train-teacher artifact (one of its per-epoch teachers; DCLIP's "sweet
spot" is a 2–3-epoch one) and the CLIP it was built on → the data's images, each with one of its
captions drawn anew every epoch by (seed, epoch, key) (train-teacher's draw) → in each step, on
the training device, the frozen text tower's outputs for the drawn captions and the frozen
teacher's embedding of (the image's regions, the caption) → the CLIP's image tower E_I trained with

    L = mean_i (1 − cos(E_I(x_i), teacher(x_i, T_i))) + InfoNCE_τ(E_I(x), E_T(T))    (τ = 0.05)
        [+ w · mean_i (1 − cos(E_I(x_i), E_I^orig(x_i)))   with preserve_weight w > 0 (ViT-L)]

The text tower is frozen for the whole run (the public code unfreezes it at epoch 3: vla does
not), and the text weights are saved bit-identical. E_I^orig(x) is the frozen original encoder's
whole-image embedding, already in the regions table. Training images go through
`data.train_preprocess` (open_clip's RandomResizedCrop, or "eval": resize + centre crop). Ranks:
`train.batch_size` is the global batch (each of N ranks streams batch_size / N images; the
InfoNCE gathers them all, as open_clip's ClipLoss); an epoch is images // (batch_size ·
grad_accum) optimizer steps on any number of ranks. The student is a plain CLIP in open_clip's
layout (`model/`): `vla eval` scores it with no boxes, `vla export` exports it.

Switches (recipe fields): `distill_weight` λ scales the first term; λ = 0 is the paper's "no
teacher" ablation (InfoNCE only: the teacher's embeddings are then never computed, though
`--teacher` still names the CLIP, data and regions the student trains on). The ViT-L additions:
`preserve_weight` (above), `rope_2d` (2-D rotary positions in place of the absolute ones) and
`clusters: 3` (three-cluster embedding aggregation) — `vla.models.dclip.vision_variants` says what each
does and which reading of the paper it is; a student with either keeps open_clip's weight layout
plus `model/vla_vision.json`, which vla re-applies on loading and `vla export` refuses.
`epochs` sets the length in passes over the data; `epoch_eval` scores the student on held-out
data (the `val` split: nothing is chosen on the test split) before training and after every
epoch (rank 0 keeps the image tower of each epoch's end and scores them all once training is
done, so no rank waits in a collective meanwhile), into the manifest (`epoch_eval`), `epochs.md` and `epochs.png` — DCLIP's "more epochs:
text→image up, zero-shot down".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import UserError
from vla.stages.common import EvalConfig
from vla.stages.common import DataConfig
from vla.train import TrainConfig

KIND = "train-student"
TEACHER_KIND = "train-teacher"


@dataclass
class TrainStudentRecipe:
    teacher: str = ""                       # a train-teacher artifact
    teacher_epoch: Optional[int] = None     # which of its per-epoch teachers; default: the last
    clip: Optional[str] = None              # must be the teacher's CLIP (the default)
    temperature: float = 0.05               # τ of the InfoNCE
    preserve_weight: float = 0.0            # w of the preservation loss (DCLIP's ViT-L addition); 0 = off
    distill_weight: float = 1.0             # λ of the distillation term; 0 = "no teacher" (InfoNCE only)
    rope_2d: bool = False                   # 2-D RoPE in place of absolute positions (ViT-L addition)
    clusters: int = 0                       # k-cluster embedding aggregation, DCLIP: 3 (ViT-L addition); 0 = off
    epochs: Optional[int] = None            # when set, train.steps = epochs × images // (batch_size · grad_accum)
    epoch_eval: bool = False                # score the val split before training and after every epoch
    epoch_eval_split: str = "val"           # the synth artifact's split scored by epoch_eval
    epoch_eval_images: int = 1000           # its first N samples
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, not {self.temperature}")
        if self.preserve_weight < 0 or self.distill_weight < 0:
            raise UserError(f"preserve_weight and distill_weight must be 0 or more, not "
                            f"{self.preserve_weight} and {self.distill_weight}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"epochs must be at least 1, not {self.epochs}")
        if self.epoch_eval_images < 2:
            raise UserError(f"epoch_eval_images must be at least 2, not {self.epoch_eval_images}")
        self.vision_variant()  # validates clusters

    def vision_variant(self):
        from vla.models.dclip.vision_variants import VisionVariant

        return VisionVariant(rope_2d=self.rope_2d, clusters=self.clusters)


def open_teacher(path: str, epoch: Optional[int]):
    """(teacher artifact, epoch) — refusing another kind or an epoch it did not save."""
    from vla.models.dclip import epoch_file

    if not path:
        raise UserError("--teacher is required: pass a train-teacher artifact (make one with `vla train-teacher`)")
    art = open_artifact(path, TEACHER_KIND, role="--teacher")
    epochs = art.manifest.get("epochs") or []
    chosen = epoch if epoch is not None else max(epochs)
    if chosen not in epochs:
        raise UserError(f"{path} has teachers for epochs {epochs}, not {chosen}; pass --epoch with one of them")
    art.file(f"teacher/{epoch_file(chosen)}")
    return art, chosen


def run(cfg: TrainStudentRecipe, data: Optional[str], out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    import dataclasses

    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.models.dclip.inputs import (TextTower, check_keys, check_same_clip, data_of, global_batch,
                                         open_regions, read_caption_lists, steps_per_epoch, teacher_inputs)
    from vla.distributed import init_distributed
    from vla.losses import dclip_student_loss
    from vla.models.clip import save_clip
    from vla.models.dclip import load_dclip_clip, load_teacher
    from vla.evaluate.epochs import (EPOCH_SNAPSHOTS, evaluate_snapshots, save_snapshot, snapshot_name,
                                     write_epoch_report)
    from vla.models.dclip.student import ImageStudent
    from vla.models.dclip.vision_variants import apply_variant, save_variant
    from vla.stages.common import evaluate_into, image_text_batches, train_on_pairs, training_data

    # inputs, all checked before any compute
    claim_out(out, force=force, inputs={"teacher": cfg.teacher, "clip": cfg.clip, "data": data})
    teacher_art, epoch = open_teacher(cfg.teacher, cfg.teacher_epoch)
    regions_art, store = open_regions(teacher_art.manifest["inputs"]["regions"]["path"], role="the teacher's regions")
    teacher_clip = teacher_art.manifest["inputs"]["clip"]["path"]
    clip, clip_input, clip_identity = load_dclip_clip(cfg.clip or teacher_clip)
    if clip_identity != teacher_art.recipe.get("clip_identity"):
        raise UserError(f"--clip {cfg.clip} is not the CLIP {teacher_clip} the teacher {cfg.teacher} was trained on; "
                        f"the student starts from the teacher's CLIP: drop --clip")
    check_same_clip(store, clip_identity, cfg.clip or teacher_clip, regions_art.path)
    variant = cfg.vision_variant()
    apply_variant(clip.model.visual, variant)  # a tower that cannot take it is refused here, before any compute
    td = training_data(data or data_of(teacher_art), split=regions_art.recipe.get("split", "train"))
    keys, _, _ = read_caption_lists(td.path, cfg.data.max_skip_fraction)
    check_keys(store, keys, td.path, regions_art.path)
    dist = init_distributed(cfg.train.device)
    # train.batch_size is the global batch (the InfoNCE's negatives); epochs count global steps
    local_train = dataclasses.replace(cfg.train, batch_size=global_batch(cfg.train.batch_size, dist.world_size,
                                                                         "train-student"))
    per_epoch = steps_per_epoch(len(keys), cfg.train.batch_size, cfg.train.grad_accum)
    if cfg.epochs is not None:
        cfg.train.steps = local_train.steps = cfg.epochs * per_epoch
    val_sets = _epoch_eval_sets(cfg, td) if cfg.epoch_eval else []
    source = resolve_data(td.path)

    # the frozen parts, all on the training device: the text tower, the teacher (λ > 0 only: the
    # "no teacher" arm never loads it) and, in each step, the teacher's targets for the batch
    for p in clip.model.parameters():
        p.requires_grad_(False)
    text = TextTower.on(clip, dist.device)
    top_k = teacher_art.recipe.get("top_k")
    teacher = None
    if cfg.distill_weight > 0:
        teacher = load_teacher(teacher_art.path / "teacher", epoch).to(dist.device)
        for p in teacher.parameters():
            p.requires_grad_(False)

    # the student: the image tower trains, everything else of the CLIP is frozen
    clip.model.visual.requires_grad_(True)
    if variant.rope_2d:  # the absolute positions stay at zero
        clip.model.visual.positional_embedding.requires_grad_(False)
    student = ImageStudent(clip.model.visual).train()
    use_preserve = cfg.preserve_weight > 0
    skips = SkipCounter()
    image_transform = clip.train_preprocess(cfg.data.train_preprocess)
    tokenizer = clip.tokenizer  # the transform runs in DataLoader workers: it holds no model

    def transform(sample) -> dict:
        # the caption first: the stream seeds torch's generator by (seed, epoch, key), so this draw
        # equals train-teacher's `caption_index` for the same epoch, whatever the augmentation after it
        drawn = int(torch.randint(len(sample.captions), ())) if len(sample.captions) > 1 else 0
        return {"image": image_transform(sample.image), "key": sample.key,
                "token_ids": tokenizer([sample.captions[drawn]])[0]}

    image_batches = image_text_batches(source, transform, local_train, cfg.data, dist, skips, str(td.path))

    def batches(start_step: int):
        for batch in image_batches(start_step):
            k = batch["key"]
            if teacher is not None:
                batch["regions"] = store.lookup(k, top_k)
            if use_preserve:
                batch["original"] = store.lookup(k, top_k=0)["regions"][:, 0]
            yield batch

    def step(m, b):
        states, mask, pooled = text.states(b["token_ids"])
        target = None
        if teacher is not None:
            with torch.no_grad():
                target = F.normalize(teacher(**teacher_inputs(b["regions"], states, mask, pooled)).float(), dim=-1)
        return dclip_student_loss(m(b["image"]), target, F.normalize(pooled.float(), dim=-1), cfg.temperature,
                                  preserve=b.get("original"), preserve_weight=cfg.preserve_weight,
                                  distill_weight=cfg.distill_weight, rank=dist.rank, world_size=dist.world_size)

    recipe = {**asdict(cfg), "teacher_epoch": epoch, "clip_identity": clip_identity}
    inputs = {**td.inputs, "teacher": teacher_art, "clip": clip_input}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs=inputs, force=force, command=command) as art:
        snapshots = art.dir / EPOCH_SNAPSHOTS
        after_step = None
        if val_sets:
            # rank 0 only writes the image tower at each epoch's end; the evaluations run after
            # training, so that no rank waits in a collective while rank 0 evaluates
            if dist.rank == 0 and not (snapshots / snapshot_name(0)).exists():
                save_snapshot(clip.model.visual, snapshots, 0)  # epoch 0: the CLIP before any step

            def after_step(m, s: int) -> None:
                if s % per_epoch == 0 and dist.rank == 0:
                    save_snapshot(m.visual, snapshots, s // per_epoch)

        train_on_pairs(art, cfg, student, step, batches, dist, skips, str(td.path), after_step=after_step)
        if dist.rank == 0:
            clip.model.eval()
            if val_sets:
                evaluate_snapshots(art.dir, snapshots, clip, val_sets, cfg.eval.batch_size, per_epoch)
                art.extra["epoch_eval"] = write_epoch_report(art.dir, cfg.epoch_eval_split, per_epoch)
            save_clip(clip, art.dir / "model")
            save_variant(art.dir / "model", variant)
            clip.name = out.name
            evaluate_into(art, clip, td.eval_dir, cfg.eval)
    return art.artifact


def _epoch_eval_sets(cfg: TrainStudentRecipe, td) -> list:
    """The held-out sets `epoch_eval` scores: built from the synth artifact's val split."""
    from vla.evaluate.split_sets import split_eval_sets

    if td.eval_dir is None:
        raise UserError("epoch_eval needs --data to be a synth artifact (its val split and zero-shot classes); "
                        "set epoch_eval: false for other data")
    split = Path(td.eval_dir).parent / cfg.epoch_eval_split
    if cfg.epoch_eval_split == "test" or not split.is_dir():
        raise UserError(f"epoch_eval_split {cfg.epoch_eval_split!r}: {split} is not a held-out split of "
                        f"{split.parent}; choose one other than test (e.g. val)")
    zeroshot = Path(td.eval_dir) / "zeroshot"
    return split_eval_sets(split, zeroshot if zeroshot.is_dir() else None, cfg.epoch_eval_images,
                           prefix=cfg.epoch_eval_split)
