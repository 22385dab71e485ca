"""`make bench`: vla's speed measured side by side with the straightforward way of doing the same.

Parts, each a module with `run(quick) -> Part`:
    a  trainer.py      training samples/s of `vla pretrain` against open_clip's own trainer
    b  cache.py        contrast-tune steps with the frozen embedder's features cached vs re-encoded
    c  retrieval.py    chunked retrieval metrics vs CLIP_benchmark's full matrices: time and memory
    d  cache_scale.py  building the feature cache for 100k and 1M captions: peak RSS and rows/s
    e  dclip.py        precompute-regions batched vs per-image/per-crop; a teacher epoch cached vs re-encoded
    f  mmgem_caption.py  MM-GEM captions/s: batched `generate` + KV cache vs decoding without a cache
    g  joint_step.py   an MM-GEM joint-train step: one shared LM forward vs two separate ones
    h  loader.py       the training loader's images/s on 256 px sources: draft decode vs full, vs 64 px sources

These are measurements, not tests: figures depend on the machine and on whatever else runs on it,
so every part records its sizes and conditions next to its numbers in `bench/results.json`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: outputs and scratch (the generated world, run directories, logs); gitignored
BENCH_DIR = Path(os.environ.get("VLA_BENCH_DIR", "bench"))


@dataclass
class Figure:
    """One row of the table: vla's figure, the baseline's, and how they compare to the goal."""

    what: str
    unit: str
    vla: float
    baseline: float
    ratio: float        # the comparison, as `ratio_is` says (e.g. vla / baseline)
    ratio_is: str       # how the ratio is formed, for the table header and the JSON
    goal: float         # the ratio aimed for
    higher_is_better: bool = True

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal


@dataclass
class Part:
    """What one part measured: its table rows and everything needed to read them."""

    name: str
    title: str
    baseline: str                                        # what vla is compared with
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # sizes, conditions, raw numbers


def alternate(first: Callable[[], T], second: Callable[[], T], rounds: int) -> tuple[list[T], list[T]]:
    """Run two measurements `rounds` times each in the order A B B A A B …, so that a steady
    drift in the machine's load (other jobs starting or ending) favours neither side."""
    a: list[T] = []
    b: list[T] = []
    for r in range(rounds):
        for run, out in ((first, a), (second, b))[:: 1 if r % 2 == 0 else -1]:
            out.append(run())
    return a, b


def bench_world(name: str, cfg: Any) -> Path:
    """A synthetic world (`cfg`: a `SynthConfig`) at BENCH_DIR/name, generated once and reused while
    its config is the same (a changed config, e.g. a new default image size, makes it again); built
    in a temporary sibling so that an interrupted generation is never reused."""
    import json
    import shutil

    from vla.data.synth import generate_world

    world, stamp, tmp = BENCH_DIR / name, BENCH_DIR / f"{name}.json", BENCH_DIR / f".{name}.tmp"
    wanted = json.dumps(cfg.__dict__, sort_keys=True)
    if world.is_dir() and stamp.exists() and stamp.read_text() == wanted:
        return world
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(world, ignore_errors=True)
    tmp.mkdir(parents=True)
    generate_world(tmp, cfg)
    tmp.rename(world)
    stamp.write_text(wanted)
    return world
