"""The embedded synthetic world: images of coloured shapes with exact boxes and texts of every kind.

`generate_world(out, cfg)` writes, into an empty directory:

    train/ val/ test/            img2dataset shards of `Sample`s (jpg, txt, json)
    eval/<task>/                 CLIP_benchmark's WebDataset layout, all from the test split, for
                                   retrieval, long_retrieval, zeroshot, regional, captioning,
                                   grounding (vla's own task: no dataset_type.txt):
    eval/<task>/test/0.tar …       shards, with test/nshards.txt; dataset_type.txt; info.json
    eval/zeroshot/classnames.txt, eval/zeroshot/zeroshot_classification_templates.txt
    eval/probe/{train,test}/     the attribute probe (task attribute_probe): train and val images
                                   with one small object, its box, its fill pattern as the class;
                                   eval/probe/classnames.txt names the patterns
    yolo/data.yaml, yolo/{images,labels}/{train,val}/   a detection copy ultralytics trains on

Every sample is a pure function of (seed, split, index) (test scenes also of the earlier test
scenes: the test split is de-duplicated so that no two test images share a long caption's
content). The retrieval set keeps only short captions that no other test image has: a
caption shared by two images could not tell them apart, and retrieval would then measure how ties
are ranked; the dropped ones are counted (`eval.retrieval.dropped_captions`). The regional set
keeps the first region of each region caption (`eval.regional.dropped_regions`); the grounding set
holds every test image with two or more objects, each region with its grounding caption. Scenes are sampled in the parent and rendered in a worker pool whose results come back
in index order, so shards are byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from vla.data.sample import Region, Sample
from vla.data.shards import ShardWriter
from vla.data.synth_text import (BACKGROUNDS, CELLS, CLASSNAMES, COLOURS, MAX_CAPTIONS_PER_IMAGE,
                                 PATTERNS, SHAPES, Obj, Scene, grounding_caption,
                                 long_caption, region_caption, short_captions)
from vla.data.synth_evalsets import EvalSetWriter, MadeSample, json_bytes, sample_captions
from vla.data.synth_render import render
from vla.errors import UserError

SPLITS = ("train", "val", "test")
JPEG_QUALITY = 95
_KINDS = [(c, s) for c in COLOURS for s in SHAPES]
_MAX_RESAMPLES = 1000  # per test index; only a tiny world (1 object, many test images) runs out


@dataclass
class SynthConfig:
    """Size and shape of the generated world."""

    seed: int = 0
    n_train: int = 20000
    n_val: int = 1000
    n_test: int = 1000
    # Stored (source) image side in pixels. Larger than the CLIP's input (64 px for the embedded
    # small CLIP, which resizes as open_clip does), so a small object's crop keeps its pixels:
    # at 256 px a small object's box is 25-43 px a side (diamonds are the narrow ones).
    image_size: int = 256
    # Fill patterns (PATTERNS): the stripe / dot / check period is the object's radius divided
    # by this (larger: finer patterns, which the downscaled global view loses sooner) ...
    pattern_period: float = 3.0
    # ... and the light/dark swing around the object's colour, in 0-255 units per channel
    # (capped per channel so nothing clips: the pattern's mean is the solid colour).
    pattern_contrast: int = 70
    min_objects: int = 1
    max_objects: int = 4
    captions_per_image: int = 5  # short paraphrases per image (retrieval with several captions)
    probe_train: int = 2000  # attribute probe: at most this many train images in eval/probe/train
    shard_size: int = 2000
    context_length: int = 16  # the small CLIP's text context, for the long-text metrics
    workers: int = 2
    yolo_train: int = 2000  # YOLO copy: the first min(n_train, yolo_train) train images, all of val

    def validate(self) -> None:
        checks = [
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (min(self.n_train, self.n_val) >= 0 and self.n_test >= 2,
             "n_train and n_val must be >= 0 and n_test >= 2 (retrieval needs a gallery)"),
            (self.image_size >= 32, f"image_size must be >= 32 pixels, got {self.image_size}"),
            (self.pattern_period > 0 and 0 <= self.pattern_contrast <= 127,
             f"pattern_period must be > 0 and pattern_contrast 0..127, got {self.pattern_period} "
             f"and {self.pattern_contrast}"),
            (1 <= self.min_objects <= self.max_objects <= len(CELLS),
             f"need 1 <= min_objects <= max_objects <= {len(CELLS)}, got {self.min_objects}..{self.max_objects}"),
            (1 <= self.captions_per_image <= MAX_CAPTIONS_PER_IMAGE,
             f"captions_per_image must be 1..{MAX_CAPTIONS_PER_IMAGE}, got {self.captions_per_image}"),
            (self.shard_size >= 1 and self.workers >= 1 and self.yolo_train >= 0,
             "shard_size and workers must be >= 1 and yolo_train >= 0"),
            (self.context_length >= 3, f"context_length must be >= 3, got {self.context_length}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"synthetic world: {msg}; fix the recipe's data settings")


# ---------------------------------------------------------------------------------------- scenes

def sample_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    """Distinct cells (so objects never overlap) and distinct colour-shape pairs (so every region
    label is unique in its image); object 0 is the one large object."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = rng.sample(range(len(CELLS)), n)
    kinds = rng.sample(_KINDS, n)
    cell_w = cfg.image_size / 3
    objects = []
    for i, (cell, (colour, shape)) in enumerate(zip(cells, kinds)):
        large = i == 0
        r = cell_w * (rng.uniform(0.36, 0.44) if large else rng.uniform(0.20, 0.25))
        row, col = divmod(cell, 3)
        # Jitter the centre but keep the whole object (plus half a pixel) inside its cell.
        cx = rng.uniform(col * cell_w + r + 0.5, (col + 1) * cell_w - r - 0.5)
        cy = rng.uniform(row * cell_w + r + 0.5, (row + 1) * cell_w - r - 0.5)
        objects.append(Obj(colour, shape, "large" if large else "small", cell, cx, cy, r,
                           rng.choice(PATTERNS)))
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(objects))


def _scene_rng(cfg: SynthConfig, split: str, index: int, attempt: int = 0) -> random.Random:
    # A string seed is hashed with SHA-512: stable across processes and Python runs.
    return random.Random(f"vla-synth/{cfg.seed}/{split}/{index}/{attempt}")


def _scenes(cfg: SynthConfig, split: str, n: int, stats: Counter) -> Iterator[tuple[int, Scene]]:
    """Scenes of a split in index order. Test scenes are resampled until their long-caption content
    is new, so every long caption identifies exactly one test image."""
    seen: set[tuple] = set()
    for index in range(n):
        scene = sample_scene(_scene_rng(cfg, split, index), cfg)
        if split == "test":
            attempt = 0
            while scene.signature() in seen:
                attempt += 1
                if attempt > _MAX_RESAMPLES:
                    raise UserError(f"synthetic world: too few distinct scenes for n_test={cfg.n_test}; "
                                    "lower n_test or raise max_objects")
                scene = sample_scene(_scene_rng(cfg, split, index, attempt), cfg)
            stats["test_resampled"] += attempt > 0
            seen.add(scene.signature())
        yield index, scene


# ------------------------------------------------------------------------------------ one sample

@dataclass(frozen=True)
class SampleTask:
    seed: int
    split: str
    index: int
    scene: Scene
    image_size: int
    captions_per_image: int
    pattern_period: float = 3.0
    pattern_contrast: int = 70


def make_sample(task: SampleTask) -> tuple[Sample, list[Obj]]:
    """Render one scene and write its texts; pure in (seed, split, index, scene)."""
    scene = task.scene
    noise_seed = [task.seed, SPLITS.index(task.split), task.index]
    image, boxes = render(scene, task.image_size, noise_seed, task.pattern_period, task.pattern_contrast)
    text_rng = random.Random(f"vla-synth-text/{task.seed}/{task.split}/{task.index}")
    regions = [Region(box=tuple(float(v) for v in box), label=o.name, caption=region_caption(o))
               for o, box in zip(scene.objects, boxes)]
    # per region (same order): its fill pattern and its grounding caption (which names its cell)
    meta = {"background": scene.background, "n_objects": len(scene.objects),
            "patterns": [o.pattern for o in scene.objects],
            "grounding_captions": [grounding_caption(o) for o in scene.objects]}
    sample = Sample(key=f"{task.split}{task.index:07d}", image=image,
                    captions=short_captions(scene, text_rng, task.captions_per_image),
                    long_caption=long_caption(scene, text_rng), regions=regions, label=scene.label,
                    meta=meta)
    return sample, list(scene.objects)


def _make(task: SampleTask) -> MadeSample:
    sample, objects = make_sample(task)
    buf = io.BytesIO()
    sample.image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    yolo = ""
    for o, r in zip(objects, sample.regions):
        x0, y0, x1, y1 = (v / task.image_size for v in r.box)
        yolo += f"{SHAPES.index(o.shape)} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} {x1 - x0:.6f} {y1 - y0:.6f}\n"
    return MadeSample(task.split, task.index, sample.key, buf.getvalue(), sample.to_json(), yolo)


def sample_tasks(cfg: SynthConfig, stats: Counter | None = None) -> Iterator[SampleTask]:
    """Every sample to make, split by split in index order; `stats` counts test resamples."""
    stats = Counter() if stats is None else stats
    for split, n in zip(SPLITS, (cfg.n_train, cfg.n_val, cfg.n_test)):
        for index, scene in _scenes(cfg, split, n, stats):
            yield SampleTask(cfg.seed, split, index, scene, cfg.image_size, cfg.captions_per_image,
                             cfg.pattern_period, cfg.pattern_contrast)


def _write_yolo_yaml(root: Path) -> None:
    # No `path:` key: ultralytics then resolves train/val against this file's folder, so the copy
    # stays valid when the artifact directory is renamed into place or moved.
    names = "\n".join(f"  {i}: {s}" for i, s in enumerate(SHAPES))
    (root / "data.yaml").write_text(f"train: images/train\nval: images/val\nnames:\n{names}\n")


def generate_world(out: Path, cfg: SynthConfig) -> dict[str, Any]:
    """Write the world into `out` (an existing, empty directory); return its counts and metrics."""
    out = Path(out)
    if not out.is_dir() or any(out.iterdir()):
        raise UserError(f"{out}: the synthetic world needs an existing empty directory; create it or empty it")
    cfg.validate()
    stats: Counter = Counter()
    writers = {split: ShardWriter(out / split, maxcount=cfg.shard_size) for split in SPLITS}
    evals = EvalSetWriter(out / "eval", cfg.shard_size, cfg.probe_train)
    yolo_root = out / "yolo"
    yolo_n = {"train": min(cfg.n_train, cfg.yolo_train), "val": cfg.n_val}
    for sub in ("images", "labels"):
        for split in yolo_n:
            (yolo_root / sub / split).mkdir(parents=True)
    test_texts: dict[str, list[str]] = {"short": [], "long": []}
    box_sides: list[float] = []  # the shorter side of every small object's box, in stored pixels

    def consume(made: Iterator[MadeSample]) -> None:
        for m in made:
            writers[m.split].write_raw(m.key, {"jpg": m.jpg, "txt": m.meta["caption"].encode("utf-8"),
                                               "json": json_bytes(m.meta)})
            if m.index < yolo_n.get(m.split, 0):
                (yolo_root / "images" / m.split / f"{m.key}.jpg").write_bytes(m.jpg)
                (yolo_root / "labels" / m.split / f"{m.key}.txt").write_text(m.yolo)
            evals.add_probe(m)
            box_sides.extend(min(r["box"][2] - r["box"][0], r["box"][3] - r["box"][1])
                             for r in m.meta["regions"][1:])
            if m.split == "test":
                evals.add(m)
                test_texts["short"] += sample_captions(m.meta)
                test_texts["long"].append(m.meta["long_caption"])

    tasks = sample_tasks(cfg, stats)
    if cfg.workers == 1:
        consume(map(_make, tasks))
    else:
        # fork on Linux: callers need no `__main__` guard and workers skip re-importing; workers
        # only run PIL and numpy, never the parent's torch/OpenMP thread pools.
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ctx.Pool(cfg.workers) as pool:
            consume(pool.imap(_make, tasks, chunksize=64))
    for w in writers.values():
        w.close()
    _write_yolo_yaml(yolo_root)

    counts = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "classes": len(CLASSNAMES),
              "test_resampled": stats["test_resampled"],
              "yolo_train": yolo_n["train"], "yolo_val": yolo_n["val"], "eval": evals.close()}
    metrics = text_metrics(test_texts["short"], test_texts["long"], cfg.context_length)
    if box_sides:
        metrics.update(small_box_min_px=float(min(box_sides)),
                       small_box_mean_px=float(sum(box_sides) / len(box_sides)))
    return {"counts": counts, "metrics": metrics}


def split_eval_sets(world: Path, split: str, out: Path, shard_size: int = 1000) -> dict[str, dict[str, int]]:
    """Write the evaluation sets that `generate_world` builds from the test split (retrieval,
    long_retrieval, zeroshot, regional, captioning, grounding; the same rules) from another split
    of the world instead, into `out` (an existing, empty directory): choices are made on `val`,
    the test split only reports. Reads the split's shards as stored (the images are not re-encoded).
    Returns each set's counts."""
    import tarfile

    world, out = Path(world), Path(out)
    shards = sorted((world / split).glob("*.tar"))
    if split not in SPLITS or not shards:
        raise UserError(f"{world}/{split}: no shards of a world split there; pass a synth artifact and one of "
                        f"{', '.join(SPLITS)}")
    if not out.is_dir() or any(out.iterdir()):
        raise UserError(f"{out}: the evaluation sets need an existing empty directory; create it or empty it")
    evals = EvalSetWriter(out, shard_size, probe_train=0)
    index = 0
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.isfile():
                    key, _, ext = Path(info.name).name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()  # type: ignore[union-attr]
        for key, parts in members.items():
            evals.add(MadeSample(split, index, key, parts["jpg"], json.loads(parts["json"]), ""))
            index += 1
    counts = evals.close()
    return {task: c for task, c in counts.items() if task != "probe"}


# --------------------------------------------------------------------------------------- metrics

def text_metrics(short: list[str], long: list[str], context_length: int) -> dict[str, float]:
    """What a `context_length`-token CLIP can read of the test texts, with open_clip's CLIP BPE.

    The visible text is exactly what open_clip feeds the model: start token, the first
    context_length-2 BPE tokens, end token. `long_text_prefix_ambiguous_fraction` is the fraction
    of long captions whose visible text is shared by another test image's long caption;
    `long_text_full_unique_fraction` the fraction whose full caption belongs to one image only.
    """
    from open_clip.tokenizer import SimpleTokenizer  # imports torch: only when metrics are needed

    tok = SimpleTokenizer()

    def lengths(texts: list[str]) -> list[int]:
        return [len(tok.encode(t)) + 2 for t in texts]  # + start and end tokens, as CLIP counts

    short_len, long_len = lengths(short), lengths(long)
    visible = [tuple(row) for row in tok(long, context_length=context_length).tolist()]
    visible_count, full_count = Counter(visible), Counter(long)
    n = len(long)
    return {
        "long_text_prefix_ambiguous_fraction": sum(visible_count[v] >= 2 for v in visible) / n,
        "long_text_full_unique_fraction": sum(full_count[t] == 1 for t in long) / n,
        "short_caption_truncated_fraction": sum(k > context_length for k in short_len) / len(short),
        "long_caption_truncated_fraction": sum(k > context_length for k in long_len) / n,
        "short_caption_mean_tokens": sum(short_len) / len(short),
        "long_caption_mean_tokens": sum(long_len) / n,
    }
