"""`vla train-student`: DCLIP's student — the CLIP image tower distilled from the meta-teacher.

Story (METHODS.md §2): a train-teacher artifact (one of its per-epoch teachers; DCLIP's "sweet
spot" is a 2–3-epoch one) and the CLIP it was built on → the teacher's embedding of every
(image, caption), computed once from the cached regions and text states and cached → the CLIP's
image tower E_I trained on the data's images with

    L = mean_i (1 − cos(E_I(x_i), teacher(x_i, T_i))) + InfoNCE_τ(E_I(x), E_T(T))    (τ = 0.05)
        [+ w · mean_i (1 − cos(E_I(x_i), E_I^orig(x_i)))   with preserve_weight w > 0 (ViT-L)]

The text tower is frozen for the whole run (the public code unfreezes it at epoch 3: vla does
not), so E_T(T) comes from the cache and the text weights are saved bit-identical. E_I^orig(x)
is the frozen original encoder's global embedding, already in the regions table. The student is
a plain CLIP in open_clip's layout (`model/`): `vla eval` scores it with no boxes, `vla export`
exports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vla.artifacts import Artifact, ArtifactBuilder, open_artifact
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
    teacher_batch_size: int = 256           # (image, caption) pairs per teacher forward when filling the cache
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, not {self.temperature}")
        if self.preserve_weight < 0:
            raise UserError(f"preserve_weight must be 0 or more, not {self.preserve_weight}")


class ImageStudent(nn.Module):
    """What train-student trains: the CLIP's image tower alone (so the optimizer never holds
    the text tower's weights)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)


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


def run(cfg: TrainStudentRecipe, data: Optional[Path], out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.cache import cached_features
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.data.teacher_inputs import (cached_text_states, check_keys, check_same_clip, data_of, open_regions,
                                         read_captions, teacher_inputs)
    from vla.distributed import init_distributed
    from vla.losses import dclip_student_loss
    from vla.models.clip import save_clip
    from vla.models.dclip import load_dclip_clip, load_teacher
    from vla.stages.common import evaluate_into, image_text_batches, train_on_pairs, training_data

    # inputs, all checked before any compute
    teacher_art, epoch = open_teacher(cfg.teacher, cfg.teacher_epoch)
    regions_art, store = open_regions(teacher_art.manifest["inputs"]["regions"]["path"], role="the teacher's regions")
    teacher_clip = teacher_art.manifest["inputs"]["clip"]["path"]
    clip, clip_input, clip_identity = load_dclip_clip(cfg.clip or teacher_clip)
    if clip_identity != teacher_art.recipe.get("clip_identity"):
        raise UserError(f"--clip {cfg.clip} is not the CLIP {teacher_clip} the teacher {cfg.teacher} was trained on; "
                        f"the student starts from the teacher's CLIP: drop --clip")
    check_same_clip(store, clip_identity, cfg.clip or teacher_clip, regions_art.path)
    td = training_data(Path(data or data_of(teacher_art)), split=regions_art.recipe.get("split", "train"))
    keys, texts, _ = read_captions(td.path, cfg.train.seed, cfg.data.max_skip_fraction)
    check_keys(store, keys, td.path, regions_art.path)
    dist = init_distributed()
    source = resolve_data(td.path)
    data_digest = source.digest()

    # frozen features, each computed once: the text tower's outputs, then the teacher's embeddings
    text = cached_text_states(clip, clip_identity, td.path, data_digest, keys, texts, cfg.teacher_batch_size)
    teacher = load_teacher(teacher_art.path / "teacher", epoch)
    top_k = teacher_art.recipe.get("top_k")

    @torch.no_grad()
    def teacher_embed(pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        emb = teacher(**teacher_inputs(store, text, [k for k, _ in pairs], top_k))
        return F.normalize(emb, dim=-1)

    # each row's input is its (key, caption) pair: the teacher reads the key's regions and text states
    targets, _hit = cached_features("dclip.teacher", lambda: ((k, (k, t), str(td.path)) for k, t in zip(keys, texts)),
                                    model_identity=f"{teacher_art.digest}:{epoch}", data_digest=data_digest,
                                    encode=teacher_embed, batch_size=cfg.teacher_batch_size)
    del teacher

    # the student: the image tower trains, everything else of the CLIP is frozen
    for p in clip.model.parameters():
        p.requires_grad_(False)
    clip.model.visual.requires_grad_(True)
    student = ImageStudent(clip.model.visual).train()
    use_preserve = cfg.preserve_weight > 0
    skips = SkipCounter()

    def transform(sample) -> dict:
        return {"image": clip.preprocess(sample.image), "key": sample.key}

    image_batches = image_text_batches(source, transform, cfg.train, cfg.data, dist, skips, str(td.path))

    def batches(start_step: int):
        for batch in image_batches(start_step):
            k = batch["key"]
            batch["teacher"] = targets.lookup(k)
            batch["text"] = F.normalize(text.pooled(k), dim=-1)
            if use_preserve:
                batch["original"] = store.lookup(k, top_k=0)["regions"][:, 0]
            yield batch

    def step(m, b):
        return dclip_student_loss(m(b["image"]), b["teacher"], b["text"], cfg.temperature,
                                  preserve=b.get("original"), preserve_weight=cfg.preserve_weight)

    recipe = {**asdict(cfg), "teacher_epoch": epoch, "clip_identity": clip_identity}
    inputs = {**td.inputs, "teacher": teacher_art, "clip": clip_input}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs=inputs, force=force, command=command) as art:
        train_on_pairs(art, cfg, student, step, batches, dist, skips, str(td.path))
        if dist.rank == 0:
            clip.model.eval()
            save_clip(clip, art.dir / "model")
            clip.name = out.name
            evaluate_into(art, clip, td.eval_dir, cfg.eval)
    return art.artifact
