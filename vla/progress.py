"""Plain progress lines for runs outside a terminal (make, nohup, Slurm, CI).

On a terminal the training loop draws a rich progress bar. Piped into a file or a log, a bar is
either nothing or carriage-return noise, so instead one line is printed to stderr at the first
step, then every `VLA_PROGRESS_SECONDS` seconds (default 30), and at the last step:

    train step 120/250 (48%)  loss 3.1234  lr 4.50e-04  152 samples/s  elapsed 0:01:02  ETA 0:01:07

Each line is complete on its own and flushed at once, so `tail -f` and Slurm's output files show
it as it happens.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

DEFAULT_SECONDS = 30.0


def interval_from_env() -> float:
    """Seconds between lines: `VLA_PROGRESS_SECONDS` (0 prints every step), default 30."""
    raw = os.environ.get("VLA_PROGRESS_SECONDS", "")
    try:
        return max(0.0, float(raw)) if raw.strip() else DEFAULT_SECONDS
    except ValueError:
        return DEFAULT_SECONDS


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class ProgressLines:
    """One plain line every `interval` seconds for steps `start+1 … total` of a run."""

    def __init__(self, total: int, start: int = 0, *, interval: float | None = None,
                 stream: TextIO | None = None, label: str = "train") -> None:
        self.total, self.start, self.label = total, start, label
        self.interval = interval_from_env() if interval is None else interval
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.last: float | None = None  # when the last line was printed
        self.first_step: tuple[float, int] | None = None  # (time, samples) after the first step

    def update(self, step: int, loss: float, lr: float, samples: int) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = (now, samples)
        due = self.last is None or now - self.last >= self.interval or step >= self.total
        if not due:
            return
        self.last = now
        self.stream.write(self.line(step, loss, lr, samples, now) + "\n")
        self.stream.flush()

    def line(self, step: int, loss: float, lr: float, samples: int, now: float) -> str:
        done = step - self.start
        # rates leave out the first step (warm-up, compilation), as the manifest's samples/s does
        t1, s1 = self.first_step or (self.t0, 0)
        rate = (samples - s1) / (now - t1) if now > t1 and samples > s1 else None
        per_step = (now - t1) / (done - 1) if done > 1 and now > t1 else None
        parts = [f"{self.label} step {step}/{self.total} ({100 * step // max(self.total, 1)}%)",
                 f"loss {loss:.4f}", f"lr {lr:.2e}",
                 f"{rate:,.0f} samples/s" if rate is not None else "- samples/s",
                 f"elapsed {_clock(now - self.t0)}"]
        if per_step is not None and step < self.total:
            parts.append(f"ETA {_clock(per_step * (self.total - step))}")
        return "  ".join(parts)


class CountLines:
    """The same plain lines for work counted in items (texts encoded into the feature cache):

        caching phi.caption: 120,000/2,000,000 texts (6%)  1,532 texts/s  elapsed 0:01:18  ETA 0:20:27
    """

    def __init__(self, total: int, label: str, unit: str = "items", *, interval: float | None = None,
                 stream: TextIO | None = None) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.interval = interval_from_env() if interval is None else interval
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.done = 0
        self.last: float | None = None

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.last is not None and now - self.last < self.interval and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else None
        parts = [f"{self.label}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done // max(self.total, 1)}%)",
                 f"{rate:,.0f} {self.unit}/s" if rate else f"- {self.unit}/s", f"elapsed {_clock(elapsed)}"]
        if rate and self.done < self.total:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        self.stream.write("  ".join(parts) + "\n")
        self.stream.flush()

    def __enter__(self) -> "CountLines":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def counter(total: int, label: str, unit: str = "items"):
    """A progress counter with `.update(n)`, used as a context manager: a tqdm bar on a terminal,
    plain `CountLines` in a log, nothing under VLA_NO_PROGRESS=1 on a terminal (tests, scripts
    that want quiet bars still get log lines when they are not on a terminal)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        quiet = os.environ.get("VLA_NO_PROGRESS", "") not in ("", "0")
        return tqdm(total=total, desc=label, unit=unit.rstrip("s"), disable=quiet, leave=False)
    return CountLines(total, label, unit)
