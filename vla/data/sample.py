"""One image–text sample, as stored in a shard's `key.json` beside `key.jpg` and `key.txt`.

img2dataset writes `key.txt` (the caption) and `key.json` (url, key, status, width, height, ...).
vla keeps that layout and adds optional fields to the JSON, so a plain img2dataset shard is a
valid vla shard and a vla shard is readable by any WebDataset tool:

    {"key": ..., "caption": ..., "width": W, "height": H,
     "captions": [...],            # several captions (retrieval with several captions per image)
     "long_caption": "...",        # a long description (long-text retrieval, ProCLIP)
     "regions": [{"box": [x0, y0, x1, y1], "label": "...", "caption": "...", "score": 1.0}],
     "label": 3}                   # class index (zero-shot classification)

Boxes are in pixels of the stored image, (x0, y0) top-left inclusive, (x1, y1) exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image


@dataclass
class Region:
    box: tuple[float, float, float, float]
    label: str = ""
    caption: str = ""
    score: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"box": [float(v) for v in self.box], "label": self.label, "caption": self.caption,
                "score": float(self.score)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Region":
        return cls(box=tuple(float(v) for v in d["box"]), label=str(d.get("label", "")),
                   caption=str(d.get("caption", "")), score=float(d.get("score", 1.0)))


@dataclass
class Sample:
    key: str
    image: Image.Image
    captions: list[str]
    long_caption: str | None = None
    regions: list[Region] = field(default_factory=list)
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        """The first (primary) caption: what img2dataset stores in `key.txt`."""
        return self.captions[0]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.meta)
        d.update(key=self.key, caption=self.caption, width=self.image.width, height=self.image.height,
                 status="success")
        if len(self.captions) > 1:
            d["captions"] = list(self.captions)
        if self.long_caption is not None:
            d["long_caption"] = self.long_caption
        if self.regions:
            d["regions"] = [r.to_json() for r in self.regions]
        if self.label is not None:
            d["label"] = int(self.label)
        return d
