"""Part e: DCLIP's two frozen-feature stages against the straightforward way of doing them.

1. `precompute-regions`: images/s of the stage's own `regions_of_batch` — the detector called on a
   batch of images, then every crop and whole image of the batch through the CLIP in big batches —
   against the same function fed one image at a time with one crop per CLIP forward (detection
   batch 1, encode batch 1: the per-image, per-crop loop of the public code). The two must give
   the same regions: the boxes are asserted equal and the embeddings equal to float tolerance.
   The detector is an untrained YOLOv8n (what matters is its cost, not its boxes) at a confidence
   threshold low enough that every image gets `TOP_K` boxes, so each image has crops to encode.
2. `train-teacher`: the time of one teacher epoch reading its region embeddings from the regions
   table (the stage's way) against one that re-encodes every region crop with the CLIP image tower
   every batch. Both run the CLIP text tower on each batch's captions, as the stage does (its token
   states are not cached). The same teacher, seed, batches and optimizer on both sides; the first
   batch's inputs are asserted equal (to the table's float16 rounding).
3. The text side of that epoch: the text tower run on every batch (the stage's way) against the
   captions' real-token states and pooled embeddings cached once in float16 and read per batch
   (the alternative the stage does not take); the cache's one-pass build time and bytes per
   caption are reported beside it, and the first batch's text inputs asserted equal.

All use vla-tiny-clip (random init; the embedded recipes' CLIP) on the benchmark's synthetic world,
the teacher at the embedded train-teacher recipe's batch of 128.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vla.bench import BENCH_DIR, bench_world, Figure, Part, alternate

CLIP = "vla-tiny-clip"
TOP_K = 4
BATCH = 64           # images per detector call (the full run)
TEACHER_BATCH = 128  # per teacher step: the embedded train-teacher recipe's batch
CONF = 1e-6          # an untrained YOLO's scores are tiny: keep its TOP_K best boxes per image
SEED = 0


def _world(n: int) -> Path:
    """A synthetic world of `n` training images (bench/dclip-world-N), generated once."""
    from vla.data.synth import SynthConfig

    return bench_world(f"dclip-world-{n}", SynthConfig(n_train=n, n_val=0, n_test=2, shard_size=max(n, 2),
                                                       yolo_train=0))


def _samples(world: Path) -> list:
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    return list(resolve_data(world / "train").iter_samples(SkipCounter()))


def _recipe(detect_batch: int, encode_batch: int):
    from vla.stages.precompute_regions import DetectConfig, PrecomputeRegionsRecipe

    return PrecomputeRegionsRecipe(detector="yolov8n.yaml", clip=CLIP, top_k=TOP_K, encode_batch_size=encode_batch,
                                   detect=DetectConfig(conf=CONF, imgsz=64, max_det=TOP_K, batch_size=detect_batch))


def _regions(detector, clip, samples, cfg) -> tuple[list, float]:
    """(ImageRegions of every sample, seconds): `regions_of_batch` over batches of cfg.detect.batch_size."""
    from vla.data.regions import new_counts
    from vla.stages.precompute_regions import regions_of_batch

    counts, out = new_counts(), []
    start = time.perf_counter()
    for i in range(0, len(samples), cfg.detect.batch_size):
        out += regions_of_batch(detector, clip, samples[i:i + cfg.detect.batch_size], cfg, counts)
    return out, time.perf_counter() - start


def _same_regions(a: list, b: list) -> float:
    """Assert two runs found the same regions; the largest embedding difference."""
    import numpy as np

    worst = 0.0
    for x, y in zip(a, b, strict=True):
        assert x.key == y.key and np.array_equal(x.boxes, y.boxes), f"{x.key}: the boxes differ"
        worst = max(worst, float(np.abs(x.emb - y.emb).max()), float(np.abs(x.global_emb - y.global_emb).max()))
    assert worst < 1e-3, f"region embeddings differ by {worst}"
    return worst


def bench_regions(samples, rounds: int, batch: int) -> tuple[Figure, dict, list]:
    import torch

    from vla.models.clip import load_clip
    from vla.models.dclip.yolo import load_detector
    from vla.models.dclip.detector import RegionDetector

    torch.manual_seed(SEED)
    clip = load_clip(CLIP)
    clip.model.eval()
    detector = RegionDetector(load_detector("yolov8n.yaml"), {"path": "yolov8n.yaml", "kind": "detector"})
    batched_cfg, loop_cfg = _recipe(batch, 512), _recipe(1, 1)
    _regions(detector, clip, samples[:2], batched_cfg)  # warm-up: ultralytics builds its predictor once
    batched, loop = alternate(lambda: _regions(detector, clip, samples, batched_cfg),
                              lambda: _regions(detector, clip, samples, loop_cfg), rounds)
    worst = _same_regions(batched[0][0], loop[0][0])
    n = len(samples)
    fast, slow = n / min(s for _, s in batched), n / min(s for _, s in loop)
    crops = sum(len(r.conf) for r in batched[0][0])
    fig = Figure("precompute-regions", "images/s", fast, slow, fast / slow, "vla / baseline", 2.0)
    return fig, {"images": n, "crops": crops, "top_k": TOP_K, "detect_batch": batch, "encode_batch": 512,
                 "batched_s": [s for _, s in batched], "per_image_per_crop_s": [s for _, s in loop],
                 "max_embedding_difference": worst}, batched[0][0]


def _text_cache(clip, captions: dict, batch: int) -> tuple[dict, float]:
    """The cached alternative to running the text tower every batch: each caption's real-token
    states and pooled embedding in float16 (as a table on disk would hold them), and the seconds
    its one pass over the captions took."""
    import torch

    from vla.models.dclip import clip_text_states

    keys, cache = list(captions), {}
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(keys), batch):
            ks = keys[i:i + batch]
            states, mask, pooled = clip_text_states(clip.model, clip.tokenizer([captions[k] for k in ks]))
            for j, k in enumerate(ks):
                cache[k] = (states[j, :int(mask[j].sum())].half(), pooled[j].half())
    return cache, time.perf_counter() - start


def _cached_states(cache: dict, keys: list):
    """A batch's (states, mask, pooled) from the cache, padded to its longest caption."""
    import torch

    length = max(cache[k][0].shape[0] for k in keys)
    dim = cache[keys[0]][1].shape[0]
    states, mask = torch.zeros(len(keys), length, dim), torch.zeros(len(keys), length, dtype=torch.bool)
    for j, k in enumerate(keys):
        n = cache[k][0].shape[0]
        states[j, :n], mask[j, :n] = cache[k][0].float(), True
    return states, mask, torch.stack([cache[k][1].float() for k in keys])


def _teacher_epoch(samples, regions_dir: Path, captions: dict, clip, from_table: bool, batch: int,
                   text_cache: dict | None = None) -> tuple[float, dict]:
    """Seconds of one teacher epoch (batches of `batch`) and the first batch's inputs; with
    `text_cache`, the text states are read from it instead of the text tower."""
    import torch

    from vla.data.regions import RegionStore
    from vla.models.dclip.inputs import teacher_inputs
    from vla.losses import dclip_teacher_loss
    from vla.models.dclip import MetaTeacher, TeacherConfig, clip_text_states
    from vla.stages.precompute_regions import encode_images

    store = RegionStore.open(regions_dir)
    by_key = {s.key: s for s in samples}
    torch.manual_seed(SEED)
    teacher = MetaTeacher(TeacherConfig(dim=clip.embed_dim, heads=4)).train()
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    keys = [s.key for s in samples]
    first = None
    start = time.perf_counter()
    for i in range(0, len(keys) - batch + 1, batch):
        batch_keys = keys[i:i + batch]
        if text_cache is not None:
            states, mask, pooled = _cached_states(text_cache, batch_keys)
        else:
            with torch.no_grad():  # the stage's way: the text tower on every batch
                states, mask, pooled = clip_text_states(clip.model, clip.tokenizer([captions[k] for k in batch_keys]))
        regions = store.lookup(batch_keys)
        if not from_table:  # every crop through the CLIP image tower again
            with torch.no_grad():
                ims = [by_key[k].image.convert("RGB") for k in batch_keys]
                boxes = [store.image(k)["boxes"] for k in batch_keys]
                crops = [im.crop(tuple(int(v) for v in box)) for im, bs in zip(ims, boxes) for box in bs]
                emb = torch.from_numpy(encode_images(clip, crops, 512, squash=True))
            again, row = torch.zeros_like(regions["regions"]), 0
            for j, bs in enumerate(boxes):
                again[j, :len(bs)] = emb[row:row + len(bs)]
                row += len(bs)
            regions = {**regions, "regions": again}
        b = teacher_inputs(regions, states, mask, pooled)
        if first is None:
            first = {k: v.clone() for k, v in b.items()}
        loss = dclip_teacher_loss(teacher(**b), b["text"], 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start, first


def bench_teacher(samples, found: list, rounds: int, batch: int) -> tuple[Figure, dict]:
    import torch

    from vla.data.regions import write_index, write_shard
    from vla.models.dclip.inputs import caption_index
    from vla.models.clip import load_clip

    torch.manual_seed(SEED)
    clip = load_clip(CLIP)
    clip.model.eval()
    scratch = BENCH_DIR / "dclip-teacher"
    shutil.rmtree(scratch, ignore_errors=True)
    regions_dir = scratch / "regions"
    write_shard(regions_dir, 0, found, clip.embed_dim, {})
    write_index(regions_dir, {"dim": clip.embed_dim, "top_k": TOP_K, "clip": CLIP, "detector": "yolov8n.yaml",
                              "data_digest": "bench"})
    captions = {s.key: s.captions[caption_index(SEED, 0, s.key, len(s.captions))] for s in samples}
    table, reencoded = alternate(lambda: _teacher_epoch(samples, regions_dir, captions, clip, True, batch),
                                 lambda: _teacher_epoch(samples, regions_dir, captions, clip, False, batch), rounds)
    a, b = table[0][1], reencoded[0][1]
    for k in a:  # the same inputs, to the table's float16 storage
        assert torch.allclose(a[k].float(), b[k].float(), rtol=5e-3, atol=5e-3), f"teacher input {k} differs"
    fast, slow = min(s for s, _ in table), min(s for s, _ in reencoded)
    fig = Figure("train-teacher epoch", "s", fast, slow, slow / fast, "speed-up", 2.0, higher_is_better=True)
    # the text side: the tower every batch (the stage) against real-token states cached once
    cache, cache_s = _text_cache(clip, captions, batch)
    per_batch, cached = alternate(lambda: _teacher_epoch(samples, regions_dir, captions, clip, True, batch),
                                  lambda: _teacher_epoch(samples, regions_dir, captions, clip, True, batch, cache),
                                  rounds)
    c = cached[0][1]
    for k in ("tokens", "token_mask", "text"):  # the same text inputs, to float16
        assert torch.allclose(a[k].float(), c[k].float(), rtol=5e-3, atol=5e-3), f"cached text input {k} differs"
    cached_s, tower_s = min(s for s, _ in cached), min(s for s, _ in per_batch)
    # goal 1: the stage's per-batch text tower is no slower than reading cached states
    text_fig = Figure("train-teacher epoch, text tower per batch vs cached states", "s", tower_s, cached_s,
                      cached_s / tower_s, "cached / per batch", 1.0, higher_is_better=True)
    cache_bytes = sum(st.numel() * 2 + po.numel() * 2 for st, po in cache.values())
    return [fig, text_fig], {"images": len(samples), "batch": batch, "table_epoch_s": [s for s, _ in table],
                             "reencoded_epoch_s": [s for s, _ in reencoded],
                             "per_batch_text_epoch_s": [s for s, _ in per_batch],
                             "cached_text_epoch_s": [s for s, _ in cached], "text_cache_build_s": cache_s,
                             "text_cache_bytes_per_caption": cache_bytes / len(cache)}


def run(quick: bool) -> Part:
    n, batch, teacher_batch = (32, 16, 16) if quick else (512, BATCH, TEACHER_BATCH)
    rounds = 1 if quick else 2
    samples = _samples(_world(n))
    region_fig, region_details, found = bench_regions(samples, rounds, batch)
    teacher_figs, teacher_details = bench_teacher(samples, found, rounds, teacher_batch)
    part = Part("e", f"DCLIP: precompute-regions on {n} images (YOLOv8n, top-{TOP_K}, {CLIP}); a train-teacher "
                     f"epoch, batch {teacher_batch}", "per-image, per-crop loop; crops re-encoded every batch")
    part.figures = [region_fig, *teacher_figs]
    part.details = {"rounds": rounds, "kept": "best run per way", "precompute_regions": region_details,
                    "train_teacher": teacher_details}
    return part
