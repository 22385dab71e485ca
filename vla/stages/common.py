"""What several stages share: resolving `--data`, the eval sets beside it, and evaluating a model
into a stage's manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vla.artifacts import open_artifact
from vla.errors import UserError


@dataclass
class DataConfig:
    """How training pairs stream from shards."""

    num_workers: int = 0
    shuffle_buffer: int = 2000
    max_skip_fraction: float = 0.01  # stop when more than this fraction of samples is corrupt
    # training images: open_clip's train transform (RandomResizedCrop, scale 0.9–1), or "eval":
    # the eval preprocessing (resize + centre crop), e.g. where aspect or position is the label
    train_preprocess: Literal["open_clip", "eval"] = "open_clip"
    # decode JPEGs at a reduced size (PIL's draft: a DCT scale of 1/2, 1/4 or 1/8) that keeps at
    # least the model's input size, where the transform resizes the whole image down to it
    # anyway: a 256 px source read by a 64 px CLIP decodes at 64 px (1/16 of the pixels)
    draft_decode: bool = True


@dataclass
class EvalConfig:
    """Which evaluation sets a training stage scores itself on when it finishes."""

    sets: list[str] = field(default_factory=lambda: ["retrieval", "long_retrieval", "zeroshot"])
    batch_size: int = 256


@dataclass
class TrainingData:
    path: Path | str                # what `resolve_data` reads: a local path or a shard specification
    inputs: dict[str, Any]          # what the manifest records as the data input
    eval_dir: Path | None           # `<synth>/eval` when the data is a synth artifact


def training_data(path: Path | str, split: str = "train") -> TrainingData:
    """`--data` is a synth artifact (its `split/` shards and `eval/` sets are used) or anything
    `resolve_data` reads: shards (a directory, a brace range, a glob, `pipe:`, URLs) or a JSONL
    manifest, recorded by its cheap digest (`DataSource.digest`)."""
    from vla.data.stream import resolve_data

    if (Path(path) / "manifest.json").exists():
        path = Path(path)
        art = open_artifact(path, "synth", role="--data")
        resolve_data(path / split)  # fail now, naming the split, if it holds no shards
        return TrainingData(path / split, {"data": art}, path / "eval")
    source = resolve_data(path)
    return TrainingData(source.path, {"data": {"path": str(source.path), "kind": "data", "digest": source.digest()}},
                        None)


def eval_sets(eval_dir: Path | None, names: list[str]) -> list:
    """Load the named evaluation sets from a synth artifact's `eval/` (skipping none silently:
    a named set that is missing is an error)."""
    from vla.evaluate.evalsets import load_eval_set

    if eval_dir is None or not names:
        return []
    sets = []
    for name in names:
        if not (eval_dir / name).is_dir():
            raise UserError(f"eval set {eval_dir / name} does not exist; known: "
                            f"{', '.join(sorted(p.name for p in eval_dir.iterdir() if p.is_dir()))}")
        sets.append(load_eval_set(eval_dir / name))
    return sets


def evaluate_into(art, model, eval_dir: Path | None, cfg: EvalConfig) -> dict[str, Any]:
    """Score `model` on the eval sets and record the results in the artifact being built."""
    from vla.evaluate.run import evaluate_model

    sets = eval_sets(eval_dir, cfg.sets)
    if not sets:
        return {}
    results = evaluate_model(model, sets, batch_size=cfg.batch_size)
    art.metrics["eval"] = results
    return results


MIN_SEEN = 1000  # samples streamed before the skip-fraction limit is enforced


def skip_limit(data_cfg, what: str):
    """The stage's `data.max_skip_fraction` over the samples of `what`."""
    from vla.data.skips import SkipLimit

    return SkipLimit(data_cfg.max_skip_fraction, what, min_seen=MIN_SEEN)


def draft_size(clip, data_cfg) -> int | None:
    """The loader's `draft_size` for a CLIP whose whole image is resized to its input: that
    input's side, when the recipe's `data.draft_decode` allows it; None otherwise."""
    size = clip.image_size
    return size if data_cfg.draft_decode and isinstance(size, int) else None


def image_text_batches(source, transform, train_cfg, data_cfg, dist, skips, what: str,
                       draft_size: int | None = None):
    """`batches(start_step)` for the training loop over image–text shards: batch k of the run is
    always the same samples, so a resumed run continues exactly; corrupt samples are counted in
    `skips` (each once, however many epochs) and this rank stops once they pass
    `data_cfg.max_skip_fraction` (the loop checks all ranks' counts at each checkpoint).
    `draft_size`: see `make_loader` (only for a transform that resizes the whole image to it)."""
    from vla.data.stream import make_loader

    limit = skip_limit(data_cfg, what)

    def batches(start_step: int):
        loader = make_loader(source, transform, train_cfg.batch_size, num_workers=data_cfg.num_workers,
                             rank=dist.rank, world_size=dist.world_size, seed=train_cfg.seed,
                             start_batch=start_step * train_cfg.grad_accum, repeat=True,
                             shuffle_buffer=data_cfg.shuffle_buffer, draft_size=draft_size)
        first = True
        for batch, skipped in loader:
            if first and data_cfg.num_workers > 0:
                check_shared_memory(batch, data_cfg.num_workers)
                first = False
            skips.add_counts(skipped)
            limit.check(skips)
            yield batch

    return batches


SHM = "/dev/shm"


def check_shared_memory(batch: dict, num_workers: int, path: str = SHM) -> None:
    """DataLoader workers hand batches over in shared memory: each worker keeps about two batches
    in flight, on every rank of the node (torchrun's LOCAL_WORLD_SIZE). Where that cannot fit in
    `/dev/shm` (a container's default is 64 MB), stop now with what to change, instead of the bus
    error a worker dies of later."""
    import os
    import shutil

    import torch

    per_batch = sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    need = per_batch * num_workers * 2 * ranks
    try:
        total = shutil.disk_usage(path).total
    except OSError:
        return  # no /dev/shm (not Linux): torch shares memory otherwise
    if need > total:
        raise UserError(f"{path} holds {total / 2**30:.2f} GiB, but {num_workers} data workers × 2 batches in "
                        f"flight × {ranks} rank(s) of {per_batch / 2**20:.0f} MiB need about {need / 2**30:.2f} GiB; "
                        f"give the container more (docker run --shm-size={max(1, int(need * 1.5 / 2**30) + 1)}g, or a "
                        "Kubernetes emptyDir with medium: Memory) or lower data.num_workers or train.batch_size")


def train_on_pairs(art, cfg, model, step, batches, dist, skips, what: str, *, after_step=None,
                   param_groups=None):
    """The shared loop for a stage over image–text batches (from `image_text_batches`, each with
    its samples' `key`s), into the artifact being built; its counts, metrics and throughput then
    go into the manifest. `cfg` is the stage's recipe (its `train` and `data` blocks);
    `param_groups(model)` gives the optimizer's groups where a stage has several learning rates
    (default: the loop's own, every trainable parameter at `train.lr`)."""
    from vla.train import train

    limit = skip_limit(cfg.data, what)
    result = train(cfg.train, model, step, batches, art.dir, after_step=after_step, param_groups=param_groups,
                   samples_per_batch=lambda b: len(b["key"]) * dist.world_size, skips=skips, skip_limit=limit)
    record_training(art, result, limit)
    art.extra["device"] = str(dist.device)  # where it trained: "cpu", "cuda:0"
    return result


def record_training(art, result, limit) -> None:
    """Put a finished training run's counts (all ranks', a resumed run's earlier part included),
    metrics and throughput into the artifact's manifest; the skip limit holds over all of them."""
    from vla.data.skips import SkipCounter

    counts = SkipCounter.total([result.data])
    limit.check(counts, final=True)
    art.counts["train"] = {"steps": result.steps, "samples": result.samples, **counts.as_dict()}
    art.metrics["train"] = result.metrics
    art.timings.update(samples_per_s=result.samples_per_s, train_wall_s=result.wall_s)
