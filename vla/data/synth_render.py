"""Rendering the embedded world's scenes: each object's exact pixel coverage (drawn at 4x and
box-averaged down), its fill pattern, and the box taken from the coverage itself."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from vla.data.synth_text import BACKGROUNDS, COLOURS, Obj, Scene

SUPERSAMPLE = 4  # draw at 4x and box-average down: antialiased edges with exact pixel coverage


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape centred at (cx, cy) whose extent is about 2r (pixel coordinates)."""
    def ring(k: int, radii: tuple[float, ...], start: float) -> list[tuple[float, float]]:
        return [(cx + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / k),
                 cy + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / k)) for i in range(k)]

    if shape == "circle":
        return ring(48, (r,), 0.0)
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return ring(10, (r, 0.45 * r), -math.pi / 2)
    if shape == "hexagon":
        return ring(6, (r,), 0.0)
    if shape == "cross":
        a = 0.35 * r
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def _coverage(obj: Obj, size: int) -> tuple[int, int, np.ndarray]:
    """(x0, y0, alpha): the fraction of each pixel the object covers, on a small window at (x0, y0)."""
    x0, y0 = max(0, math.floor(obj.cx - obj.r) - 1), max(0, math.floor(obj.cy - obj.r) - 1)
    x1, y1 = min(size, math.ceil(obj.cx + obj.r) + 1), min(size, math.ceil(obj.cy + obj.r) + 1)
    s = SUPERSAMPLE
    mask = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    points = [((x - x0) * s, (y - y0) * s) for x, y in _outline(obj.shape, obj.cx, obj.cy, obj.r)]
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return x0, y0, np.asarray(mask.reduce(s), dtype=np.float32) / 255.0


def pattern_field(pattern: str, xs: np.ndarray, ys: np.ndarray, period: float) -> np.ndarray:
    """The fill modulation at pixel offsets (xs, ys) from the object's centre: +1 light, negative
    dark, 0 for "solid", with mean ~0 over the object, so the fill averages to the solid colour
    and a view that cannot resolve `period` sees a solid object. striped: horizontal bands
    +1/-1; checked: a checkerboard of +1/-1 squares; dotted: +1 dots of radius 0.3 period on a
    square lattice, the rest -f/(1-f) (f: the dots' area fraction)."""
    if pattern == "solid":
        return np.zeros(np.broadcast(xs, ys).shape, dtype=np.float32)
    u, v = xs / period, ys / period
    band_x = np.where((u - np.floor(u)) < 0.5, 1.0, -1.0)
    band_y = np.where((v - np.floor(v)) < 0.5, 1.0, -1.0)
    if pattern == "striped":
        return np.broadcast_to(band_y, np.broadcast(xs, ys).shape).astype(np.float32)
    if pattern == "checked":
        return (band_x * band_y).astype(np.float32)
    if pattern == "dotted":
        du, dv = u - np.rint(u), v - np.rint(v)
        radius = 0.3
        f = math.pi * radius ** 2
        return np.where(du * du + dv * dv < radius ** 2, 1.0, -f / (1 - f)).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def render(scene: Scene, size: int, noise_seed: list[int], pattern_period: float = 3.0,
           pattern_contrast: int = 70) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """The image and each object's box (x0, y0, x1, y1), x1/y1 exclusive.

    A box is the extent of the pixels the object covers at least half of — taken from the drawn
    coverage itself, so it is exact by construction rather than predicted from the geometry.
    An object's fill is its colour plus `pattern_field` times a per-channel swing of
    min(pattern_contrast, c, 255 - c) (no channel clips), at period r / pattern_period pixels.
    """
    rng = np.random.default_rng(noise_seed)
    # Light texture: a soft linear shading in a random direction plus uniform pixel noise of +-7
    # (integer noise: a third of the cost of Gaussian noise, and rendering is the hot loop).
    theta = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-8.0, 8.0, size, dtype=np.float32)
    shading = ramp[None, :] * math.cos(theta) + ramp[:, None] * math.sin(theta)
    noise = rng.integers(0, 15, (size, size, 3), dtype=np.uint8).astype(np.float32) - 7.0
    img = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32) + shading[..., None] + noise
    boxes = []
    for obj in scene.objects:
        x0, y0, alpha = _coverage(obj, size)
        h, w = alpha.shape
        window = img[y0:y0 + h, x0:x0 + w]
        a = alpha[..., None]
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        fill = colour
        if obj.pattern != "solid":
            swing = np.minimum(np.minimum(colour, 255.0 - colour), float(pattern_contrast))
            xs = np.arange(x0, x0 + w, dtype=np.float32)[None, :] + 0.5 - obj.cx
            ys = np.arange(y0, y0 + h, dtype=np.float32)[:, None] + 0.5 - obj.cy
            field = pattern_field(obj.pattern, xs, ys, max(obj.r / pattern_period, 2.0))
            fill = colour + field[..., None] * swing
        window[:] = window * (1.0 - a) + fill * a
        ys, xs = np.nonzero(alpha >= 0.5)
        boxes.append((x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1))
    pixels = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), boxes


