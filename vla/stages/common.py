"""What several stages share: resolving `--data`, the eval sets beside it, and evaluating a model
into a stage's manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla.artifacts import Artifact, open_artifact
from vla.errors import UserError


@dataclass
class EvalConfig:
    """Which evaluation sets a training stage scores itself on when it finishes."""

    sets: list[str] = field(default_factory=lambda: ["retrieval", "long_retrieval", "zeroshot"])
    batch_size: int = 256


@dataclass
class TrainingData:
    path: Path                      # the shard directory (or .jsonl) actually read
    inputs: dict[str, Any]          # what the manifest records as the data input
    eval_dir: Path | None           # `<synth>/eval` when the data is a synth artifact
    synth: Artifact | None = None


def training_data(path: Path, split: str = "train") -> TrainingData:
    """`--data` is a synth artifact (its `split/` shards and `eval/` sets are used) or a directory
    of WebDataset shards / a JSONL manifest (recorded by content digest)."""
    from vla.data.stream import resolve_data

    path = Path(path)
    if (path / "manifest.json").exists():
        art = open_artifact(path, "synth", role="--data")
        source = resolve_data(path / split)
        return TrainingData(path / split, {"data": art}, path / "eval", art)
    if not path.exists():
        raise UserError(f"--data {path} does not exist; make the embedded world with `vla synth --out {path}` "
                        f"or point --data at a directory of WebDataset shards")
    source = resolve_data(path)
    return TrainingData(path, {"data": {"path": str(path), "kind": "data", "digest": source.digest()}}, None)


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
