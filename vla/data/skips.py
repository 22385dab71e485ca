"""Counting the samples a stage read and the corrupt ones it skipped, by reason.

Web data is never clean: a reader skips a corrupt sample and counts why, the stage records the
counts in its manifest, and it fails only when the skipped fraction passes the recipe's limit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vla.errors import StageError

# Every reason a reader may skip a sample for (shards and JSONL manifests alike).
SKIP_REASONS = (
    "missing_image", "missing_caption", "empty_file", "undecodable_image", "truncated_image",
    "decompression_bomb", "empty_caption", "non_utf8_caption", "box_outside_image", "bad_json",
)


@dataclass
class SkipCounter:
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def used(self) -> int:
        return self.seen - sum(self.skipped.values())

    def skip(self, reason: str) -> None:
        """Count one skipped sample; the caller has already counted it as seen."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.skipped[reason] += 1

    def merge(self, other: "SkipCounter") -> None:
        self.seen += other.seen
        self.skipped.update(other.skipped)

    def add_counts(self, counts: dict[str, Any]) -> None:
        """Add counts in the `as_dict()` form: how they cross from DataLoader workers."""
        self.seen += int(counts.get("seen", 0))
        self.skipped.update({k: int(v) for k, v in counts.get("skipped", {}).items()})

    def as_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "used": self.used,
                "skipped": {k: v for k, v in sorted(self.skipped.items()) if v}}

    def check(self, max_fraction: float, what: str, setting: str = "data.max_skip_fraction",
              min_seen: int = 0) -> None:
        """Raise StageError when more than `max_fraction` of the samples seen were skipped.

        While streaming, pass `min_seen` so that a few bad samples early on (14 in a first batch
        of 256) do not stop a stage whose data is fine overall."""
        total = self.seen - self.used
        if self.seen == 0 or self.seen < min_seen or total / self.seen <= max_fraction:
            return
        reasons = ", ".join(f"{k}: {v}" for k, v in self.skipped.most_common() if v)
        raise StageError(f"{total} of {self.seen} samples in {what} skipped ({reasons}), above "
                         f"{setting}={max_fraction:g}; fix the data or raise the limit")
