"""The captions of a data set as one table, for the stages that encode text with frozen models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class CaptionTable:
    keys: list[str]
    short: list[str]                 # each sample's first caption
    second: list[str] | None         # the second text variant, if any
    second_field: str = ""           # what the second variant is: "long_caption" or "caption2"


def read_captions(path: Path, second: str, max_skip_fraction: float) -> tuple[CaptionTable, dict]:
    """Every sample's captions, without decoding images (distillation is text only)."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    skips = SkipCounter()
    keys, short, other = [], [], []
    for s in resolve_data(path).iter_samples(skips, decode=False):
        keys.append(s.key)
        short.append(s.captions[0])
        if second == "long_caption":
            other.append(s.long_caption or s.captions[0])
        elif second == "caption":
            other.append(s.captions[1] if len(s.captions) > 1 else s.captions[0])
    skips.check(max_skip_fraction, str(path))
    column = {"long_caption": "long_caption", "caption": "caption2"}.get(second, "")
    return CaptionTable(keys, short, other if second != "none" else None, column), skips.as_dict()
