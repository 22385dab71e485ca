"""Part h: the training loader's images/s on the world's 256 px source images, with and without
draft decoding, and beside the same world stored at the CLIP's own 64 px.

The loader is `vla pretrain`'s: `make_loader` over a world's train shards (one process, no
workers, so the figure is the decode + transform cost per image, not a parallel speed-up), each
image through the small CLIP's eval preprocessing (open_clip's resize to 64 px + centre crop +
normalise, as recipes/embedded/pretrain.yaml trains with). Three ways, on the same scenes:

    draft      256 px JPEGs decoded at a DCT scale of 1/4 (PIL's `Image.draft`): 64 px straight
               from the decoder (`data.draft_decode`, the default)
    full       256 px JPEGs decoded whole, then resized to 64 px
    stored-64  the same world generated at 64 px (the source size before it was raised)

The figures: draft against full (the speed-up draft buys), and draft against stored-64 (what
the 256 px source costs the loader, goal: not materially slower). Each way runs `rounds` times,
the order rotating every round; the best run of each is kept.
"""

from __future__ import annotations

import time
from pathlib import Path

from vla.bench import bench_world, Figure, Part

CLIP_SIZE = 64  # vla-tiny-clip's input
BATCH = 128


def _world(image_size: int, n: int) -> Path:
    """A world of `n` train images at `image_size` px (bench/loader-<size>), made once and reused."""
    from vla.data.synth import SynthConfig

    cfg = SynthConfig(n_train=n, n_val=0, n_test=20, image_size=image_size, shard_size=1000,
                      yolo_train=0, probe_train=0)
    return bench_world(f"loader-{image_size}", cfg)


def images_per_s(world: Path, draft: bool) -> tuple[float, int]:
    """(images/s, images) of one pass over the world's train split through the training loader."""
    from open_clip.transform import image_transform

    from vla.data.stream import make_loader, resolve_data

    preprocess = image_transform(CLIP_SIZE, is_train=False)

    def transform(sample) -> dict:
        return {"image": preprocess(sample.image), "key": sample.key}

    loader = make_loader(resolve_data(world / "train"), transform, BATCH, drop_last=False,
                         draft_size=CLIP_SIZE if draft else None)
    start, n = time.perf_counter(), 0
    for batch, _ in loader:
        assert batch["image"].shape[-1] == CLIP_SIZE
        n += len(batch["key"])
    return n / (time.perf_counter() - start), n


def run(quick: bool) -> Part:
    n = 128 if quick else 4096
    rounds = 1 if quick else 3
    big, small = _world(256, n), _world(CLIP_SIZE, n)
    ways = {"draft": lambda: images_per_s(big, True), "full": lambda: images_per_s(big, False),
            "stored64": lambda: images_per_s(small, False)}
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in ways}
    for r in range(rounds):  # the order rotates each round: a drift in load favours no way
        order = list(ways)[r % 3:] + list(ways)[:r % 3]
        for k in (order if r % 2 == 0 else order[::-1]):
            runs[k].append(ways[k]())
    draft_runs, full_runs, small_runs = runs["draft"], runs["full"], runs["stored64"]
    draft, full, stored = (max(r[0] for r in runs) for runs in (draft_runs, full_runs, small_runs))
    part = Part("h", f"training loader, {n} images, 256 px source → {CLIP_SIZE} px CLIP input, one process",
                "decoding the whole 256 px JPEG; the world stored at 64 px")
    part.figures = [
        Figure("loader, draft vs full decode", "images/s", draft, full, draft / full, "vla / baseline", 1.5),
        Figure("loader, 256 px draft vs 64 px source", "images/s", draft, stored, draft / stored,
               "vla / baseline", 0.8),
    ]
    part.details = {"images": n, "batch": BATCH, "rounds": rounds, "kept": "best run per way",
                    "draft_images_per_s": [r[0] for r in draft_runs],
                    "full_images_per_s": [r[0] for r in full_runs],
                    "stored64_images_per_s": [r[0] for r in small_runs],
                    "images_seen": {"draft": draft_runs[0][1], "full": full_runs[0][1],
                                    "stored64": small_runs[0][1]}}
    return part
