"""Counting the samples a stage read and the corrupt ones it skipped, by reason.

Web data is never clean: a reader skips a corrupt sample and counts why, the stage records the
counts in its manifest, and it fails only when the skipped fraction passes the recipe's limit.
The first few skipped samples are named (shard and key, or manifest and line), so a user can
find them. A training stream counts each sample once, however many epochs it walks (see
`vla.data.stream`), and the counts travel in the training checkpoints, so a resumed run counts
exactly what an uninterrupted one does and its limit still holds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vla.errors import StageError

# Every reason a reader may skip a sample for (shards and JSONL manifests alike).
SKIP_REASONS = (
    "missing_image", "missing_caption", "empty_file", "undecodable_image", "truncated_image",
    "decompression_bomb", "empty_caption", "non_utf8_caption", "box_outside_image", "bad_json",
    "no_usable_region",
)
MAX_EXAMPLES = 5  # skipped samples named in the counts and in the error


class SkipSample(Exception):
    """Raised by a stage's transform for a sample it cannot use (e.g. stage2-roi: no region with a
    caption and a box left by the crop): the stream counts it as skipped for `reason` (one of
    SKIP_REASONS) instead of failing. A transform that raises it may define ``validate(sample)``,
    the same test without the work, which a resume's counting pass runs to find its place."""

    def __init__(self, reason: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(reason)
        self.reason = reason


@dataclass
class SkipCounter:
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # "where (reason)" of the first skipped

    @property
    def used(self) -> int:
        return self.seen - sum(self.skipped.values())

    def skip(self, reason: str, where: str | None = None) -> None:
        """Count one skipped sample; the caller has already counted it as seen. `where` names it
        ("00003.tar key 000123", "train.jsonl line 7")."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.skipped[reason] += 1
        if where is not None:
            self._name([f"{where} ({reason})"])

    def _name(self, examples: Iterable[str]) -> None:
        for e in examples:
            if len(self.examples) >= MAX_EXAMPLES:
                return
            self.examples.append(e)

    def merge(self, other: "SkipCounter") -> None:
        self.seen += other.seen
        self.skipped.update(other.skipped)
        self._name(other.examples)

    def add_counts(self, counts: dict[str, Any]) -> None:
        """Add counts in the `as_dict()` form: how they cross from DataLoader workers, between
        ranks and into checkpoints."""
        self.seen += int(counts.get("seen", 0))
        self.skipped.update({k: int(v) for k, v in counts.get("skipped", {}).items()})
        self._name(counts.get("examples", ()))

    @classmethod
    def total(cls, counts: Iterable[dict[str, Any]]) -> "SkipCounter":
        """The sum of several `as_dict()` counts (one per rank)."""
        out = cls()
        for c in counts:
            out.add_counts(c)
        return out

    def restore(self, by_rank: list[dict[str, Any]], rank: int, world_size: int) -> None:
        """Continue from a checkpoint's counts (`as_dict()` of each rank, by rank): this rank's own
        when the world size is unchanged, else rank 0 carries the total and the others start at 0,
        so the sum over ranks (what the manifest reports) is unchanged."""
        self.seen, self.skipped, self.examples = 0, Counter(), []
        if len(by_rank) == world_size:
            self.add_counts(by_rank[rank])
        elif rank == 0:
            self.add_counts(self.total(by_rank).as_dict())

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"seen": self.seen, "used": self.used,
                             "skipped": {k: v for k, v in sorted(self.skipped.items()) if v}}
        if self.examples:
            d["examples"] = list(self.examples)
        return d

    def check(self, max_fraction: float, what: str, setting: str = "data.max_skip_fraction",
              min_seen: int = 0) -> None:
        """Raise StageError when more than `max_fraction` of the samples seen were skipped.

        While streaming, pass `min_seen` so that a few bad samples early on (14 in a first batch
        of 256) do not stop a stage whose data is fine overall."""
        total = self.seen - self.used
        if self.seen == 0 or self.seen < min_seen or total / self.seen <= max_fraction:
            return
        reasons = ", ".join(f"{k}: {v}" for k, v in self.skipped.most_common() if v)
        first = f"; first: {', '.join(self.examples)}" if self.examples else ""
        # the smallest limit in whole percent that these counts pass; a rerun with it resumes
        enough = min(1.0, math.ceil(total / self.seen * 100) / 100)
        raise StageError(f"{total} of {self.seen} samples in {what} skipped ({reasons}){first}, above "
                         f"{setting}={max_fraction:g}; fix the data or raise the limit "
                         f"(--set {setting}={enough:g}; a rerun resumes)")


@dataclass(frozen=True)
class SkipLimit:
    """The most a training stage may skip: `max_fraction` of the samples seen in `what`.

    `min_seen` applies while streaming (see `SkipCounter.check`); the final check, before the last
    checkpoint is written, applies the limit to every sample seen."""

    max_fraction: float
    what: str
    setting: str = "data.max_skip_fraction"
    min_seen: int = 1000

    def check(self, counts: SkipCounter, *, final: bool = False) -> None:
        counts.check(self.max_fraction, self.what, self.setting, min_seen=0 if final else self.min_seen)
