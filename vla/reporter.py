"""What the training loop reports, on rank 0: `metrics.jsonl` (one record every `log_every` steps,
each metric averaged since the last record, with the lr, samples and samples/s; a resume first
drops the records after its step), TensorBoard with `train.tensorboard`, and a rich progress bar
on a terminal or plain progress lines elsewhere (vla/progress.py). `Clock` gives the samples/s
that leave out the run's first step (warm-up, compilation, cache fills)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vla.progress import ProgressLines

if TYPE_CHECKING:
    from vla.train import TrainConfig

log = logging.getLogger("vla.train")


class Clock:
    """Samples/s that leave out this call's first step (warm-up, compilation, cache fills)."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None  # (time, samples) when the 1st step ended
        self.mark: tuple[float, int] | None = None  # the same at the last `window()` call

    def tick(self, samples: int) -> None:
        if self.first is None:
            self.first = self.mark = (time.perf_counter(), samples)

    @staticmethod
    def _rate(since: tuple[float, int] | None, samples: int) -> float | None:
        if since is None or samples <= since[1]:
            return None
        return (samples - since[1]) / (time.perf_counter() - since[0])

    def overall(self, samples: int) -> float | None:
        return self._rate(self.first, samples)

    def window(self, samples: int) -> float | None:
        """Rate since the previous call (or the first step); starts a new window."""
        rate = self._rate(self.mark, samples)
        self.mark = (time.perf_counter(), samples)
        return rate


class Reporter:
    """Rank 0's outputs: metrics.jsonl (always), TensorBoard, a progress bar or log lines."""

    def __init__(self, cfg: TrainConfig, workdir: Path, start: int, clock: Clock, *,
                 enabled: bool) -> None:
        self.cfg, self.clock, self.enabled = cfg, clock, enabled
        self.window: list[dict[str, float]] = []  # steps since the last record
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = workdir / "metrics.jsonl"
        truncate_records(self.metrics_path, start)  # a resume redoes the steps after `start`
        self.writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1)
        self.progress = progress_bar(cfg.steps, start)
        # outside a terminal: plain lines every few seconds instead of the bar (vla/progress.py)
        self.lines = ProgressLines(cfg.steps, start) if self.progress is None else None

    def step(self, step: int, stats: dict[str, float], lr: float, samples: int,
             grad_norm: torch.Tensor | None) -> None:
        if not self.enabled:
            return
        self.window.append(stats)
        if self.progress is not None:
            sps = self.clock.overall(samples)
            self.progress.update(self.task, completed=step, loss=f"{stats['loss']:.4f}",
                                 lr=f"{lr:.2e}", sps="-" if sps is None else f"{sps:,.0f}")
        else:
            self.lines.update(step, stats["loss"], lr, samples)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self._record(step, lr, samples, grad_norm)

    def _record(self, step: int, lr: float, samples: int, grad_norm: torch.Tensor | None) -> None:
        rec: dict[str, Any] = {"step": step}
        for k in self.window[0]:
            rec[k] = float(np.mean([w[k] for w in self.window]))  # mean since the last record
        rec.update(lr=lr, samples=samples, samples_per_s=self.clock.window(samples))
        if grad_norm is not None:
            rec["grad_norm"] = float(grad_norm)  # of this step only
        self.window = []
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            for k, v in rec.items():
                if k != "step" and v is not None:
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.progress is None:
            sps = rec["samples_per_s"]
            log.info("step %d/%d  loss %.4f  lr %.2e  %s samples/s", step, self.cfg.steps,
                     rec["loss"], lr, "-" if sps is None else f"{sps:,.0f}")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()

    @property
    def task(self):
        return self.progress.task_ids[0]


def progress_bar(total: int, start: int):
    """A rich bar on a terminal (stderr) unless VLA_NO_PROGRESS=1; None otherwise."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True)
    if not console.is_terminal or os.environ.get("VLA_NO_PROGRESS") == "1":
        return None
    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[sps]} samples/s"), TimeRemainingColumn(), console=console,
    )
    progress.add_task("train", total=total, completed=start, loss="-", lr="-", sps="-")
    progress.start()
    return progress


def truncate_records(path: Path, last_step: int) -> None:
    """Drop metrics.jsonl records after `last_step` (they are about to be recomputed)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= last_step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))
