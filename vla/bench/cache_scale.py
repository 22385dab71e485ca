"""Part d: building the feature cache at scale — peak memory must not grow with the data.

`vla.cache.cached_features` fills an entry for N generated captions (100k and 1M), each size in
a fresh process, so that its peak RSS is its own: the kernel's high-water mark of that process
(VmHWM), not `ru_maxrss`, which in a child started by fork + exec also holds the parent's RSS
at the fork (a child of a 1 GB parent reads ~1 GB there while its own VmHWM is 11 MB). The
captions are generated on the fly from their index, as a stream, so that the data layer's cost
(reading shards) stays out of the figure and only the cache is measured: reading the texts
twice (key and index, then encoding), sorting the key digests, encoding, writing, renaming.

The embedder is `vla-tiny-qwen` (a real Qwen3 code path built from config: 2 layers, width 32,
last-token pooling, random weights), small enough that 1M captions take minutes on 2 CPU cores;
`--quick` (what the test suite runs) builds 12k and 48k rows with `wide` instead, a fixed random
projection of a text's first 64 bytes to 1024 floats (no model, so it is fast): its rows are as
wide as Qwen3-Embedding's, so any row kept in memory would show (48k rows held: +96 MB).

The child processes run with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_), so that a
freed buffer goes back to the system and peak RSS measures memory in use, not how fragmented
the heap's high-water mark happened to be (without it, a few windows in, the peak wanders by
±15 MB at any size).

Figures: peak RSS at 1M against 100k (goal: within 10%), and rows/s at 1M against 100k (goal:
the rate holds at scale). The details also hold each build's CPU seconds (all threads): under
load from other processes, rows per CPU second compare the two builds where wall-clock rates
mostly compare the load during each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vla.bench import BENCH_DIR, Figure, Part
from vla.bench.memory import status_mb

SIZES = (100_000, 1_000_000)
QUICK_SIZES = (12_000, 48_000)
EMBEDDER, QUICK_EMBEDDER = "vla-tiny-qwen", "wide"
BATCH = 256

_SIZE = ("small", "large", "tiny", "big", "huge")
_COLOUR = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey")
_SHAPE = ("circle", "square", "triangle", "star", "rectangle", "hexagon")
_WHERE = ("left of", "right of", "above", "below", "next to", "far from")


def caption(i: int) -> str:
    """A generated caption of 4–16 words, fixed by its index, which it ends with in 7 digits: the
    same length distribution at every size (with the index's own digits, 1M captions would be a
    token longer on average than 100k, and encode ~8% slower per row for that alone)."""
    h = (i * 2654435761) & 0xFFFFFFFF
    parts = [f"a {_SIZE[h % 5]} {_COLOUR[(h >> 3) % 9]} {_SHAPE[(h >> 7) % 6]}"]
    for j in range((h >> 11) % 3):
        g = (h >> (13 + 4 * j)) * (j + 7)
        parts.append(f"{_WHERE[g % 6]} a {_COLOUR[(g >> 3) % 9]} {_SHAPE[(g >> 5) % 6]}")
    return " ".join(parts) + f" ({i:07d})"


def rows(n: int):
    """(key, caption, shard) of n generated samples, 10,000 to a shard, as img2dataset names them."""
    return ((f"{i:09d}", caption(i), f"{i // 10_000:05d}.tar") for i in range(n))


def _wide_encoder():
    import numpy as np
    import torch

    projection = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))

    def encode(texts):  # each text's first 64 bytes, projected: fast, and a function of the text alone
        raw = b"".join(t.encode()[:64].ljust(64) for t in texts)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(-1, 64).astype(np.float32)) @ projection

    return encode, "wide-1024"


def _child(n: int, embedder: str) -> dict:
    """In this process: fill a fresh cache entry for n captions; its figures."""
    import torch

    from vla.cache import cached_features

    if embedder == "wide":
        encode, identity = _wide_encoder()
    else:
        from vla.models.embedder import load_embedder

        model = load_embedder(embedder)
        encode, identity = model.embed, model.digest()
    baseline = status_mb("VmRSS")
    cpu = time.process_time()
    start = time.perf_counter()
    with torch.inference_mode():
        table, hit = cached_features("bench.caption", lambda: rows(n), model_identity=identity,
                                     data_digest=f"generated:{n}", encode=encode, batch_size=BATCH)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu
    assert not hit and len(table) == n
    probe = [f"{i:09d}" for i in (0, n // 2, n - 1)]
    assert table.lookup(probe).shape == (3, table.dim)
    return {"rows": n, "embedder": embedder, "dim": table.dim, "seconds": seconds, "rows_per_s": n / seconds,
            "cpu_seconds": cpu_seconds, "rows_per_cpu_s": n / cpu_seconds,
            "rss_before_mb": baseline,
            "peak_rss_mb": status_mb("VmHWM")}


def measure(n: int, workdir: Path, embedder: str = EMBEDDER) -> dict:
    """Build the cache for n captions in a fresh process with its own cache directory (removed
    afterwards); that process' figures."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = {**os.environ, "VLA_CACHE_DIR": str(workdir), "VLA_NO_PROGRESS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "vla.bench.cache_scale", str(n), embedder],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"cache build of {n} rows failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(quick: bool) -> Part:
    (small_n, large_n), embedder = (QUICK_SIZES, QUICK_EMBEDDER) if quick else (SIZES, EMBEDDER)
    small = measure(small_n, BENCH_DIR / "cache-scale" / str(small_n), embedder)
    large = measure(large_n, BENCH_DIR / "cache-scale" / str(large_n), embedder)
    label = lambda n: f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M"  # noqa: E731
    part = Part("d", f"feature cache build, {embedder}, {label(small_n)} and {label(large_n)} captions",
                f"the same build at {label(small_n)} captions")
    ratio_is = f"{label(large_n)} / {label(small_n)}"
    part.figures = [
        Figure("peak RSS", "MB", large["peak_rss_mb"], small["peak_rss_mb"],
               large["peak_rss_mb"] / small["peak_rss_mb"], ratio_is, 1.10, higher_is_better=False),
        Figure("cache build rate", "rows/s", large["rows_per_s"], small["rows_per_s"],
               large["rows_per_s"] / small["rows_per_s"], ratio_is, 0.90),
    ]
    part.details = {"small": small, "large": large, "batch": BATCH, "embedder": embedder,
                    "malloc_mmap_threshold": 131072,
                    "data": "generated captions streamed from their index (no shard reading)"}
    return part


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]), sys.argv[2])))
