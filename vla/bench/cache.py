"""Part b: the contrast-tune step with the frozen embedder Φ's features cached vs re-encoded.

The step and the Φ batches are contrast-tune's own (`vla.stages.contrast_tune.contrast_step`,
`phi_batches`, `draw_caption`, `phi_columns`): the small CLIP's image tower (trained) with a
frozen copy as the L_reg teacher, a ProCLIP adapter over real MiniLM features, InfoNCE +
self-distillation, the shared training loop `vla.train.train`, the same shard read through the
same loader. Each sample draws its caption per epoch as the stage does (its long caption with
the embedded recipe's probability). The two runs differ only in where a batch's Φ comes from:

    cached      rows looked up in the feature tables (`vla.cache`), filled once beforehand
    re-encoded  MiniLM runs on the batch's drawn captions inside every step

The full run measures each way twice (cached, re-encoded, re-encoded, cached) and keeps each
way's best run. The one-time cost of filling the tables (every caption of the shard, short and
long) is measured too, and with it the number of steps after which the cache has paid for itself.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from vla.bench import BENCH_DIR, Figure, Part, alternate

BATCH = 128
LONG_CAPTION_PROB = 0.5  # recipes/embedded/proclip/contrast-tune.yaml
SEED = 0


def _build(embedder):
    """A fresh ImageTextAligner, identical for a given seed (both runs start from the same one)."""
    import torch

    from vla.losses import LogitScale
    from vla.models.proclip.adapter import Adapter, AdapterConfig
    from vla.models.clip import load_clip
    from vla.models.proclip.ema import make_ema_teacher
    from vla.models.proclip import ImageTextAligner

    torch.manual_seed(SEED)
    clip = load_clip("vla-tiny-clip")
    visual = clip.model.visual.requires_grad_(True)
    adapter = Adapter.from_config(AdapterConfig.proclip(embedder.dim, clip.embed_dim))
    model = ImageTextAligner(visual, adapter, LogitScale(), make_ema_teacher(visual))
    return clip, model.train()


def fill_cache(shard: Path, embedder) -> tuple[dict, float, int]:
    """Φ of every caption in `shard` (each short caption and the long one) into a fresh cache, as
    contrast-tune fills it: ({caption index: table}, seconds, texts)."""
    import os

    from vla.data.captions import read_captions
    from vla.data.stream import resolve_data
    from vla.stages.contrast_tune import phi_columns

    scratch = BENCH_DIR / "cache-fill"
    shutil.rmtree(scratch, ignore_errors=True)  # a fresh cache, so this is a fill, not a hit
    os.environ["VLA_CACHE_DIR"] = str(scratch.resolve())
    captions, _ = read_captions(shard, 1.0)
    start = time.perf_counter()
    tables = phi_columns(captions, embedder, resolve_data(shard).digest(), 256, "cpu")
    return tables, time.perf_counter() - start, sum(len(t) for t in tables.values())


def train_steps(shard: Path, embedder, tables: dict | None, steps: int) -> float:
    """Samples/s of `steps` contrast-tune steps; Φ from `tables`, or re-encoded when None."""
    from vla.data.stream import make_loader, resolve_data
    from vla.losses import ClipLoss
    from vla.stages.contrast_tune import LONG, contrast_step, draw_caption, phi_batches
    from vla.train import TrainConfig, train

    clip, model = _build(embedder)

    def transform(sample) -> dict:
        drawn = draw_caption(sample, LONG_CAPTION_PROB)  # first, as in the stage
        caption = sample.long_caption if drawn == LONG else sample.captions[drawn]
        return {"image": clip.preprocess(sample.image), "key": sample.key, "caption_index": drawn,
                "caption": caption}

    def image_batches(start_step: int):
        loader = make_loader(resolve_data(shard), transform, BATCH, seed=SEED, start_batch=start_step,
                             repeat=True, shuffle_buffer=2000)  # the stage's default buffer
        for batch, _skipped in loader:
            yield batch

    def reencoded(start_step: int):  # the frozen tower runs again on every step's captions
        for batch in image_batches(start_step):
            batch.pop("caption_index")
            batch["phi"] = embedder.embed(batch["caption"])
            yield batch

    batches = phi_batches(image_batches, tables, embedder.dim) if tables is not None else reencoded
    step = contrast_step(ClipLoss(), reg_weight=1.0)
    workdir = BENCH_DIR / "runs" / ("cache-hit" if tables else "cache-reencode")
    shutil.rmtree(workdir, ignore_errors=True)  # never resume an earlier run
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=3e-4, warmup_steps=2, precision="fp32",
                      device="cpu", checkpoint_every=steps, log_every=steps)
    result = train(cfg, model, step, batches, workdir, samples_per_batch=lambda b: len(b["key"]))
    return result.samples_per_s


def run(quick: bool) -> Part:
    from vla.bench.trainer import ensure_world
    from vla.models.embedder import load_embedder

    steps = 5 if quick else 15
    shard = sorted((ensure_world() / "train").glob("*.tar"))[0]
    embedder = load_embedder("minilm")
    tables, fill_s, n_texts = fill_cache(shard, embedder)
    cached_runs, reencoded_runs = alternate(lambda: train_steps(shard, embedder, tables, steps),
                                            lambda: train_steps(shard, embedder, None, steps),
                                            rounds=1 if quick else 2)
    cached, reencoded = max(cached_runs), max(reencoded_runs)
    # per-step seconds saved by the cache → steps until the fill is paid back
    saved = BATCH / reencoded - BATCH / cached
    part = Part("b", f"contrast-tune step, MiniLM Φ, batch {BATCH}, {steps} steps",
                "Φ re-encoding every batch")
    part.figures = [Figure("training throughput", "samples/s", cached, reencoded, cached / reencoded,
                           "vla / baseline", 2.0)]
    part.details = {"steps": steps, "batch": BATCH, "shard": str(shard), "embedder": embedder.name,
                    "long_caption_prob": LONG_CAPTION_PROB, "kept": "best run per way",
                    "cached_samples_per_s": cached_runs, "reencoded_samples_per_s": reencoded_runs,
                    "cache_fill_s": fill_s,
                    "cache_fill_texts": n_texts, "cache_fill_texts_per_s": n_texts / fill_s,
                    "break_even_steps": fill_s / saved if saved > 0 else None}
    return part
