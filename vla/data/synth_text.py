"""The synthetic world's vocabulary and grammar: what a scene is, and how it is described.

A scene is a background plus 1–9 objects, each a (colour, shape, size, pattern) in its own cell
of a 3x3 grid. The fill pattern (`PATTERNS`: solid, striped, dotted, checked) is a fine
attribute: a zero-mean light/dark modulation of the object's colour with a period of a few
source pixels, which the CLIP's downscaled global view averages away and a crop keeps. Object 0 is the *primary* object: the only large one, so "the largest object" is always
well defined and its "colour shape" is the image's class for zero-shot classification.

Three kinds of text describe a scene:
- short captions: paraphrases about the primary object (and maybe one more), short enough for a
  16-token CLIP context — what the small CLIP is pre-trained on;
- a long caption: every object with colour, size, shape and position, plus relations. It opens
  with a generic preamble (style, background, object count) that alone fills the first 14 BPE
  tokens, so a 16-token CLIP sees only what many images share and the deciding details lie past
  its context — the analogue of 77-token CLIP on DOCCI / Urban-1k captions;
- region captions: one per object, what its crop shows and nothing else, e.g. "a small dotted
  blue star" (no position: a crop does not know where it was);
- grounding captions: a region caption with the object's cell, e.g. "a small dotted blue star in
  the center", for the within-image grounding set (rank one image's boxes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("circle", "cross", "diamond", "hexagon", "square", "star", "triangle")
# Saturated colours far apart in RGB and from every background, so a colour word names a pixel colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40),
    "green": (40, 170, 70), "cyan": (40, 200, 220), "blue": (40, 80, 220),
    "purple": (140, 60, 190), "pink": (245, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (238, 238, 238), "grey": (128, 128, 128), "black": (24, 24, 24), "beige": (205, 190, 160),
}
CELLS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right")
# Fill patterns: the fine attribute (see the module doc); "solid" is an unmodulated fill.
PATTERNS = ("solid", "striped", "dotted", "checked")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Zero-shot classes: every "colour shape", sorted so class indices are stable across runs.
CLASSNAMES: tuple[str, ...] = tuple(sorted(f"{c} {s}" for c in COLOURS for s in SHAPES))
# CLIP-style prompt ensemble (METHODS §4: never a single prompt).
TEMPLATES = (
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a rendering of the {c}.",
    "an image showing a {c}.",
    "a picture of a large {c}.",
    "a simple illustration of a {c}.",
    "a {c} on a plain background.",
    "a close-up of the {c}.",
)

# Short-caption paraphrases. {p}: primary "pattern colour shape" ("solid" left unsaid), {a_p}: the same with its article,
# {q}: a second object, {pos}: the primary's cell. Each names the primary and at least two more
# facts (cell, background, second object, count), so that few test images share a caption (the
# eval sets drop the few that still do). Each fits in 14 BPE tokens (16 with start/end) for every
# word above.
# (Templates at 14 tokens without it end without a period; {ns}: "one shape", "two shapes", ...)
_SHORT_COMMON = (
    "a large {p} in the {pos} on {bg}.",
    "{p} in the {pos}; {ns} on {bg}",
)
_SHORT_MANY = (
    "a large {p} and a small {q}.",
    "{p} in the {pos} and a {q}",
    "{a_p} and a {q} on {bg}.",
    "{n} shapes: {a_p} and a {q}",
)
_SHORT_ALONE = (
    "a single {p} in the {pos} on {bg}.",
    "only one shape: {a_p} in the {pos}",
    "one {p} in the {pos} and nothing else.",
    "{a_p} alone in the {pos}, {bg} background",
)
MAX_CAPTIONS_PER_IMAGE = len(_SHORT_COMMON) + len(_SHORT_MANY)

# Each preamble spends at least 14 BPE tokens before saying anything beyond style, background
# and count (checked by the generator's long-text metrics).
_PREAMBLES = (
    "This is a synthetic picture with a plain {bg} background, and it contains {n} {shapes} in total.",
    "Here is a simple computer drawing on a flat {bg} background that shows {n} geometric {shapes}.",
    "The following image was rendered on a uniform {bg} background and has {n} {shapes} in it.",
)
_OTHER_OBJECT = ("There is also a {d} in the {pos}.", "A {d} sits in the {pos}.",
                 "In the {pos} there is a {d}.")


@dataclass(frozen=True)
class Obj:
    """One drawn object: its words, its grid cell, and its geometry in pixels (centre, half-extent)."""

    colour: str
    shape: str
    size: str  # "large" (the primary object) or "small"
    cell: int  # 0..8, row-major over the 3x3 grid
    cx: float
    cy: float
    r: float
    pattern: str = "solid"  # one of PATTERNS

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def described(self) -> str:
        """"size pattern colour shape", e.g. "small striped red star"."""
        return f"{self.size} {self.pattern} {self.name}"

    @property
    def position(self) -> str:
        return CELLS[self.cell]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]  # objects[0] is the primary object

    @property
    def primary(self) -> Obj:
        return self.objects[0]

    @property
    def label(self) -> int:
        return CLASSNAMES.index(self.primary.name)

    def described_order(self) -> list[Obj]:
        """Primary first, then the others in reading order: the order the long caption uses."""
        return [self.primary] + sorted(self.objects[1:], key=lambda o: o.cell)

    def signature(self) -> tuple:
        """Everything the long caption states; two scenes with equal signatures read the same."""
        return (self.background,) + tuple((o.colour, o.shape, o.size, o.pattern, o.cell)
                                          for o in self.described_order())


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def region_caption(obj: Obj) -> str:
    """What the object's crop shows: size, pattern, colour, shape; never its place in the image."""
    return f"a {obj.described}"


def grounding_caption(obj: Obj) -> str:
    """A region caption that also names the object's cell (the within-image grounding set)."""
    return f"{region_caption(obj)} in the {obj.position}"


def _patterned(obj: Obj) -> str:
    """ "pattern colour shape", with "solid" left unsaid (short captions stay short)."""
    return obj.name if obj.pattern == "solid" else f"{obj.pattern} {obj.name}"


def short_captions(scene: Scene, rng: random.Random, k: int) -> list[str]:
    """`k` distinct paraphrases about the primary object, in random order."""
    others = scene.described_order()[1:]
    pool = _SHORT_COMMON + (_SHORT_MANY if others else _SHORT_ALONE)
    p = _patterned(scene.primary)
    fields = dict(p=p, a_p=_with_article(p), q=others[0].name if others else "", bg=scene.background,
                  pos=scene.primary.position, n=NUMBERS[len(scene.objects)],
                  ns=f"{NUMBERS[len(scene.objects)]} shape{'s' if len(scene.objects) > 1 else ''}")
    return [t.format(**fields) for t in rng.sample(pool, k)]


def _relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b` on the grid, e.g. "above and to the left of"."""
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    vertical = "above" if ra < rb else "below" if ra > rb else ""
    horizontal = "to the left of" if ca < cb else "to the right of" if ca > cb else ""
    return " and ".join(p for p in (vertical, horizontal) if p)


def long_caption(scene: Scene, rng: random.Random) -> str:
    """Preamble, every object (size, pattern, colour, shape, position), then relations of consecutive objects."""
    objs = scene.described_order()
    n = len(objs)
    parts = [rng.choice(_PREAMBLES).format(bg=scene.background, n=NUMBERS[n],
                                           shapes="shape" if n == 1 else "shapes")]
    parts.append(f"The largest one is a {objs[0].described} in the {objs[0].position}.")
    for o in objs[1:]:
        parts.append(rng.choice(_OTHER_OBJECT).format(d=o.described, pos=o.position))
    for a, b in zip(objs, objs[1:]):
        parts.append(f"The {a.name} is {_relation(a, b)} the {b.name}.")
    return " ".join(parts)
