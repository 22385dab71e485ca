"""DCLIP's disk and RAM per training pair, measured on a built regions table, scaled to a corpus.

    python -m vla.bench.dclip_footprint --regions runs/dclip/regions [--pairs 3300000 --dim 512 --regions-per-image R]

Disk: `precompute-regions`' output is the only per-pair cache DCLIP keeps (the teacher's text
token states are computed on the device each batch, never stored). Its bytes split into a per-image
part (the whole-image embedding, an offset, the key) and a per-region part (embedding, box,
confidence, class, area); the measured total is fitted exactly by those two counts, and each part's
embedding bytes scale with the CLIP dimension (float16), the rest does not.

RAM: what the teacher and student stages hold in memory for the table: the key index
(`RegionStore.open`: key → shard and row) and the caption lists (`read_caption_lists`: every
image's captions), measured with tracemalloc on the same table and data; the arrays themselves are
memory-mapped (the page cache holds what is read, not the process).
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
from pathlib import Path


def measure(regions: Path) -> dict:
    """Bytes on disk per image and per region, and in memory per image, for a built table."""
    import numpy as np

    from vla.data.regions import RegionStore
    from vla.models.dclip.inputs import data_of, read_caption_lists
    from vla.artifacts import open_artifact
    from vla.stages.common import training_data

    art = open_artifact(regions, "precompute-regions", role="--regions")
    root = art.path / "regions"
    index = json.loads((root / "index.json").read_text())
    dim = int(index["dim"])
    files = [p for p in root.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    per_image_files = ("global.npy", "offsets.npy", "keys.json", "counts.json")
    image_bytes = sum(p.stat().st_size for p in files if p.name in per_image_files or p.name == "index.json")
    region_bytes = total - image_bytes
    n_images = sum(len(json.loads((root / s / "keys.json").read_text())) for s in index["shards"])
    n_regions = sum(int(np.load(root / s / "offsets.npy")[-1]) for s in index["shards"])

    tracemalloc.start()
    store = RegionStore.open(root)
    after_store = tracemalloc.get_traced_memory()[0]
    td = training_data(data_of(art), split=art.recipe.get("split", "train"))
    keys, captions, _ = read_caption_lists(td.path, 1.0)
    after_captions = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    n_captions = sum(len(c) for c in captions)
    del store, keys
    return {"dim": dim, "images": n_images, "regions": n_regions, "captions": n_captions,
            "disk_bytes": total, "disk_bytes_per_image_row": image_bytes / n_images,
            "disk_bytes_per_region_row": region_bytes / max(n_regions, 1),
            "ram_index_bytes_per_image": after_store / n_images,
            "ram_captions_bytes_per_image": (after_captions - after_store) / n_images,
            "captions_per_image": n_captions / n_images}


def scale(m: dict, pairs: int, dim: int, regions_per_image: float) -> dict:
    """Disk and RAM for `pairs` images of one caption each at CLIP dimension `dim`: the embedding
    bytes (2 per float16 value) rescaled from the measured table's dimension, the rest as measured."""
    image_row = m["disk_bytes_per_image_row"] + 2 * (dim - m["dim"])
    region_row = m["disk_bytes_per_region_row"] + 2 * (dim - m["dim"])
    ram_captions = m["ram_captions_bytes_per_image"] / m["captions_per_image"]  # one caption per pair
    return {"pairs": pairs, "dim": dim, "regions_per_image": regions_per_image,
            "disk_bytes_per_image_row": image_row, "disk_bytes_per_region_row": region_row,
            "disk_gb": pairs * (image_row + regions_per_image * region_row) / 1e9,
            "ram_gb": pairs * (m["ram_index_bytes_per_image"] + ram_captions) / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vla.bench.dclip_footprint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--regions", type=Path, required=True, help="a precompute-regions artifact")
    ap.add_argument("--pairs", type=int, default=3_300_000)
    ap.add_argument("--dim", type=int, default=512, help="the CLIP's embedding dimension (ViT-B/16: 512)")
    ap.add_argument("--regions-per-image", type=float, default=None,
                    help="default: the measured table's mean")
    a = ap.parse_args(argv)
    m = measure(a.regions)
    r = a.regions_per_image if a.regions_per_image is not None else m["regions"] / m["images"]
    print(json.dumps({"measured": m, "scaled": scale(m, a.pairs, a.dim, r)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
