"""`vla eval-teacher`: DCLIP's meta-teachers as retrieval models, beside the base CLIP.

Story (docs/dclip.md): one or more teachers — a train-teacher artifact (`PATH` for its last
epoch, `PATH:N` for epoch N) or a train-student artifact (the teacher and epoch that student
distilled) — and regions tables of held-out images (`--regions`, `vla precompute-regions` with
`split: val`, one per detector the teachers trained on: each teacher reads the table built with
its own training table's detector and CLIP) → the first `images` images of that table and their
captions (each kept only where no other of those images has it, as the val retrieval set of
`train-student`'s `epoch_eval` keeps them) → for every caption T and image x the teacher's score
s(T, x) = cos(teacher(x, T), u_T) (`vla.evaluate.teacher`: N_texts × N_images teacher forwards,
batched) → retrieval recall both ways, and the base CLIP's on the same images and captions,
s(T, x) = cos(E_I(x), u_T) → an artifact with results.json, results.md (`vla eval`'s table
layout, so `python -m vla.docs eval` makes a page of it) and the metrics in the manifest.

This asks whether the teacher is a better retrieval model than the CLIP it was built on, before
asking whether a student inherits anything from it. The teacher sees the caption it is scored
against (it is a cross-encoder), so its numbers bound what it can pass on; they are not a
student's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import UserError

KIND = "eval-teacher"
SET_NAME = "val_retrieval"


@dataclass
class EvalTeacherRecipe:
    images: int = 200             # the first N images of the held-out regions table
    pair_batch: int = 8192        # (caption, image) pairs per teacher forward
    device: str = "auto"          # auto | cpu | cuda
    mode: Literal["clip_benchmark", "pessimistic", "expected"] = "clip_benchmark"  # tie ranking

    def __post_init__(self) -> None:
        if self.images < 2:
            raise UserError(f"images must be at least 2, not {self.images}")
        if self.pair_batch < 1:
            raise UserError(f"pair_batch must be at least 1, not {self.pair_batch}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, not {self.device!r}")


@dataclass
class TeacherRef:
    art: object                   # the train-teacher artifact
    epoch: int
    label: str
    via: object = None            # the train-student artifact it was named through, if any


def resolve_teacher(ref: str) -> TeacherRef:
    """`PATH` / `PATH:N` of a train-teacher artifact, or a train-student artifact (its teacher and
    epoch); refuses an epoch the teacher did not save and a student that distilled no teacher."""
    from vla.models.dclip import epoch_file

    path, epoch = ref, None
    if not (Path(ref) / "manifest.json").exists() and ":" in ref:
        path, _, n = ref.rpartition(":")
        if not n.isdigit():
            raise UserError(f"teacher {ref!r}: write PATH or PATH:EPOCH (an epoch number), not {n!r}")
        epoch = int(n)
    art = open_artifact(path, ("train-teacher", "train-student"), role="teacher")
    via = None
    if art.kind == "train-student":
        if epoch is not None:
            raise UserError(f"{path} is a train-student artifact: it names its teacher's epoch itself; drop :{epoch}")
        if not art.recipe.get("distill_weight", 1.0) > 0:
            raise UserError(f"{path} distilled no teacher (distill_weight 0); name a train-teacher artifact instead")
        via, epoch = art, int(art.recipe["teacher_epoch"])
        art = open_artifact(art.manifest["inputs"]["teacher"]["path"], "train-teacher", role=f"the teacher of {path}")
    epochs = art.manifest.get("epochs") or []
    epoch = max(epochs) if epoch is None and epochs else epoch
    if epoch not in epochs:
        raise UserError(f"{art.path} has teachers for epochs {epochs}, not {epoch}; write {art.path}:N with one of them")
    art.file(f"teacher/{epoch_file(epoch)}")
    label = f"teacher ({art.path.name}, epoch {epoch})"
    return TeacherRef(art, epoch, label if via is None else f"{label} of {via.path.name}", via)


def _detector_identity(ref: dict) -> str:
    return str(ref.get("digest") or ref.get("sha256") or ref.get("path"))


def _held_out_table(teacher: TeacherRef, tables: list) -> tuple:
    """The (artifact, store) among `tables` built with the detector and CLIP of the teacher's own
    training table, from another split than it; refused when there is none."""
    from vla.models.dclip.inputs import open_regions

    train_art, train_store = open_regions(teacher.art.manifest["inputs"]["regions"]["path"],
                                          role=f"the regions of {teacher.art.path}")
    want = _detector_identity(train_store.meta["detector"])
    for art, store in tables:
        if _detector_identity(store.meta["detector"]) == want and store.meta["clip"] == train_store.meta["clip"]:
            if (art.recipe.get("split") == train_art.recipe.get("split")
                    and store.meta.get("data_digest") == train_store.meta.get("data_digest")):
                raise UserError(f"--regions {art.path} holds the images {teacher.art.path} trained on; build one of "
                                f"held-out images with `vla precompute-regions --set split=val`")
            return art, store
    raise UserError(f"no --regions table was built with the detector ({train_store.meta['detector'].get('path')}) "
                    f"and CLIP that {teacher.art.path} trained on; build one with `vla precompute-regions --data … "
                    f"--detector {train_store.meta['detector'].get('path')} --set split=val`")


def held_out_pairs(art, store, n_images: int) -> tuple[list[str], list[str], list[int]]:
    """(image keys, captions, each caption's image index): the first `n_images` images of the
    table's data split that the table holds, and their captions owned by no other of them."""
    from collections import Counter

    from vla.models.dclip.inputs import data_of, read_caption_lists
    from vla.stages.common import training_data

    td = training_data(data_of(art), split=art.recipe.get("split", "train"))
    keys, captions, _ = read_caption_lists(td.path, max_skip_fraction=1.0)
    chosen = [(k, c) for k, c in zip(keys, captions) if k in store][:n_images]
    if len(chosen) < 2:
        raise UserError(f"{art.path} holds {len(chosen)} images of {td.path}; the retrieval needs at least 2")
    owners = Counter(c for _, caps in chosen for c in set(caps))
    texts, text_to_image, image_keys = [], [], []
    for k, caps in chosen:
        mine = [c for c in dict.fromkeys(caps) if owners[c] == 1]
        if mine:
            image_keys.append(k)
            texts += mine
            text_to_image += [len(image_keys) - 1] * len(mine)
    return image_keys, texts, text_to_image


def pair_cosines(scores, text_to_image) -> dict[str, float]:
    """The mean score of the true (caption, image) pairs and of all the others."""
    import torch

    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=scores.device)
    positive = scores[torch.arange(len(t2i), device=scores.device), t2i]
    others = scores.numel() - positive.numel()
    return {"positive_cos": float(positive.mean()),
            "negative_cos": float((scores.sum() - positive.sum()) / max(others, 1))}


def run(cfg: EvalTeacherRecipe, teachers: Sequence[str], regions: Sequence[str], out: Path, *,
        force: bool = False, command: Sequence[str] | None = None) -> Artifact:
    import json

    import torch.nn.functional as F

    from vla.models.dclip.inputs import TextTower, open_regions
    from vla.distributed import resolve_device
    from vla.evaluate.report import results_markdown
    from vla.evaluate.retrieval import score_retrieval_metrics
    from vla.evaluate.teacher import mean_pairwise_cosine, teacher_score_matrix, text_outputs
    from vla.models.dclip import load_dclip_clip, load_teacher

    if not teachers:
        raise UserError("vla eval-teacher needs at least one teacher (a train-teacher or train-student artifact)")
    if not regions:
        raise UserError("--regions is required: a regions table of held-out images (`vla precompute-regions "
                        "--set split=val`)")
    claim_out(out, force=force, inputs={**{f"teacher{i}": t.split(":")[0] for i, t in enumerate(teachers)},
                                        **{f"regions{i}": r for i, r in enumerate(regions)}})
    refs = [resolve_teacher(t) for t in teachers]
    tables = [open_regions(r) for r in regions]
    chosen = [_held_out_table(t, tables) for t in refs]
    clip_refs = {t.art.manifest["inputs"]["clip"]["path"] for t in refs}
    identities = {t.art.recipe.get("clip_identity") for t in refs}
    if len(identities) != 1:
        raise UserError(f"the teachers were built on different CLIPs ({', '.join(sorted(clip_refs))}); "
                        f"compare teachers of one CLIP per run")
    clip_ref = sorted(clip_refs)[0]
    device = resolve_device(cfg.device)
    clip, clip_input, _ = load_dclip_clip(clip_ref)
    del clip.model.visual  # the base CLIP's image embeddings are the tables' whole-image ones
    text = TextTower.on(clip, device)

    inputs = {"clip": clip_input, **{f"teacher{i}": t.via or t.art for i, t in enumerate(refs)},
              **{f"regions{i}": a for i, (a, _) in enumerate(tables)}}
    with ArtifactBuilder(out, KIND, recipe=cfg, inputs=inputs, force=force, command=command) as art:
        results, seconds, sizes, pairs_cache = {}, {}, {}, {}
        for ref, (table_art, store) in zip(refs, chosen):
            key = str(table_art.path)
            if key not in pairs_cache:
                keys, captions, t2i = held_out_pairs(table_art, store, cfg.images)
                states, mask, pooled = text_outputs(text, captions)
                u = F.normalize(pooled.float(), dim=-1)
                start = time.perf_counter()
                glob = F.normalize(store.lookup(keys, top_k=0)["regions"][:, 0].float(), dim=-1).to(device)
                base = score_retrieval_metrics(u @ glob.T, t2i, mode=cfg.mode)
                base.update(**pair_cosines(u @ glob.T, t2i),
                            output_cos_across_images=float(mean_pairwise_cosine(glob)),
                            n_images=len(keys), n_texts=len(captions))
                label = f"CLIP ({Path(clip_ref).name}) on {table_art.path.name}"
                results[label] = {SET_NAME: base}
                seconds[label] = round(time.perf_counter() - start, 2)
                pairs_cache[key] = (keys, captions, t2i, states, mask, pooled)
                sizes[table_art.path.name] = {"images": len(keys), "texts": len(captions)}
            keys, captions, t2i, states, mask, pooled = pairs_cache[key]
            teacher = load_teacher(ref.art.path / "teacher", ref.epoch).to(device)
            top_k = ref.art.recipe.get("top_k")
            start = time.perf_counter()
            across: list[float] = []
            scores = teacher_score_matrix(teacher, states, mask, pooled, store.lookup(keys, top_k),
                                          pair_batch=cfg.pair_batch, across_images=across)
            metrics = score_retrieval_metrics(scores, t2i, mode=cfg.mode)
            metrics.update(**pair_cosines(scores, t2i), output_cos_across_images=sum(across) / len(across),
                           n_images=len(keys), n_texts=len(captions))
            results[f"{ref.label} on {table_art.path.name}"] = {SET_NAME: metrics}
            seconds[ref.label] = round(time.perf_counter() - start, 2)
            del teacher, scores
        notes = ["A teacher row scores each (caption T, image x) pair by cos(teacher(x, T), u_T): the teacher "
                 "conditioned on the caption it is scored against, against that caption's frozen CLIP text "
                 "embedding (a cross-encoder; N_texts × N_images forwards). The CLIP row scores cos(E_I(x), u_T) "
                 "on the same images and captions, E_I(x) the regions table's whole-image embedding.",
                 "positive_cos / negative_cos (val_retrieval table, ×100): the mean score of the true pairs / of "
                 "all other pairs; output_cos_across_images: the mean cosine between the outputs for two different "
                 "images (a teacher: for the same caption, averaged over captions; the CLIP: E_I(x) and E_I(x')) — "
                 "near 100, the output hardly depends on the image.",
                 "Images: the first " + ", ".join(f"{v['images']} of {k} ({v['texts']} captions)"
                                                  for k, v in sizes.items())
                 + "; a caption is kept only where no other of these images has it."]
        (art.dir / "results.md").write_text(results_markdown(results, cfg.mode, notes))
        (art.dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        art.metrics.update(results)
        art.counts.update(sizes)
        art.timings["seconds_per_model"] = seconds
        art.extra["device"] = str(device)
        art.extra["teachers"] = [{"label": r.label, "path": str(r.art.path), "epoch": r.epoch} for r in refs]
    return art.artifact
