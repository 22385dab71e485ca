"""Scoring a training run after each epoch: the trained tower saved at each epoch's end
(`save_snapshot`), every snapshot scored once training is done (`evaluate_snapshots`: no rank
waits in a collective while rank 0 evaluates), one row per epoch in a log that a resumed run
extends, and the table and curves written from it (`write_epoch_report`: epochs.md, epochs.png).
`vla train-student`'s `epoch_eval` uses it."""

from __future__ import annotations

from pathlib import Path

from torch import nn

EPOCH_EVAL_LOG = "epoch_eval.jsonl"
EPOCH_SNAPSHOTS = "epoch-snapshots"   # the image tower at each epoch's end, until it is evaluated
#: the curves: (set suffix, metric) → label
EPOCH_SERIES = {("retrieval", "image_retrieval_recall@1"): "text→image R@1",
                ("retrieval", "text_retrieval_recall@1"): "image→text R@1",
                ("zeroshot", "acc1"): "zero-shot top-1"}


def snapshot_name(epoch: int) -> str:
    return f"epoch{epoch:03d}.safetensors"


def save_snapshot(visual: nn.Module, directory: Path, epoch: int) -> None:
    from vla.models.weights import save_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    save_state_dict({k: v.detach().cpu() for k, v in visual.state_dict().items()}, directory / snapshot_name(epoch))


def evaluate_snapshots(out: Path, directory: Path, clip, sets, batch_size: int, per_epoch: int) -> None:
    """Score each saved epoch's image tower on `sets` into the per-epoch log (epochs a resumed run
    logged already are skipped), then put the final weights back and delete the snapshots."""
    import shutil

    from vla.models.weights import load_state_dict

    visual = clip.model.visual
    final = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    logged = epoch_rows(out / EPOCH_EVAL_LOG)
    for path in sorted(directory.glob("epoch*.safetensors")):
        epoch = int(path.stem[len("epoch"):])
        if epoch not in logged:
            visual.load_state_dict(load_state_dict(path))
            log_epoch(out / EPOCH_EVAL_LOG, epoch, epoch * per_epoch, clip, sets, batch_size)
    visual.load_state_dict(final)
    shutil.rmtree(directory, ignore_errors=True)


def epoch_rows(log: Path) -> dict[int, dict]:
    """{epoch: row} of the per-epoch log (an epoch a resumed run repeated: its last row)."""
    import json

    if not log.exists():
        return {}
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return {r["epoch"]: r for r in rows}


def log_epoch(log: Path, epoch: int, step: int, clip, sets, batch_size: int) -> None:
    """Score `clip` on `sets` and append one row {epoch, step, "set/metric": value} to the log."""
    import json

    from vla.evaluate.run import evaluate_model

    row = {"epoch": epoch, "step": step}
    for set_name, metrics in evaluate_model(clip, sets, batch_size=batch_size).items():
        row.update({f"{set_name}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    with log.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_epoch_report(out: Path, split: str, steps_per_epoch: int) -> list[dict]:
    """epochs.md (a table) and epochs.png (one curve per metric) from the per-epoch log; its rows."""
    from vla.evaluate.report import write_curve

    rows = [r for _, r in sorted(epoch_rows(out / EPOCH_EVAL_LOG).items())]
    series = {f"{split}_{suffix}/{metric}": f"{split} {label}" for (suffix, metric), label in EPOCH_SERIES.items()}
    series = {k: v for k, v in series.items() if any(k in r for r in rows)}
    lines = ["| epoch | step | " + " | ".join(series.values()) + " |", "|---:|---:|" + "---:|" * len(series)]
    for r in rows:
        cells = [f"{100 * r[k]:.1f}" if r.get(k) is not None else "" for k in series]
        lines.append(f"| {r['epoch']} | {r['step']} | " + " | ".join(cells) + " |")
    (out / "epochs.md").write_text("\n".join(lines) + "\n")
    write_curve(rows, "epoch", series, out / "epochs.png",
                f"train-student after each epoch of {steps_per_epoch} steps (epoch 0: the CLIP it starts from)")
    return rows
