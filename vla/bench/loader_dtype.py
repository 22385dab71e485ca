"""Part u: the image–text loader handing uint8 images to the main process vs fp32 ones.

pretrain and contrast-tune keep images uint8 through the DataLoader workers and normalise them
in the image tower's forward pre-hook on the device (`ClipModel.normalize_uint8_inputs`); the
baseline is open_clip's float transform (ToTensor + Normalize in the workers), whose batches are
4× larger in the workers' shared memory. Both run the same loader (`vla.data.stream.make_loader`,
its workers, the same crops) over the same shards; the uint8 side's images/s includes the
normalisation (here on the CPU, in the main process: on a GPU it is a device op), so the
comparison is of what reaches the model. Bytes per batch are reported beside.
"""

from __future__ import annotations

import time
from pathlib import Path

from vla.bench import bench_world, Figure, Part, alternate

SEED = 0


def _world(n: int) -> Path:
    from vla.data.synth import SynthConfig

    return bench_world(f"loader-world-{n}", SynthConfig(n_train=n, n_val=0, n_test=2, shard_size=max(n // 4, 2),
                                                        yolo_train=0))


def run(quick: bool) -> Part:
    import torch

    from vla.data.stream import make_loader, resolve_data
    from vla.models.clip import load_clip

    n, batch, workers, batches, rounds = (64, 16, 2, 3, 1) if quick else (2048, 256, 4, 6, 3)
    arch = "vla-micro-clip" if quick else "ViT-B-16"
    clip = load_clip(arch)
    source = resolve_data(_world(n) / "train")
    transforms = {"uint8": clip.uint8_train_preprocess(), "fp32": clip.train_preprocess()}
    cfg = clip.model.visual.preprocess_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    sizes = {}

    def measure(kind: str):
        def once() -> float:
            def transform(sample):
                return {"image": transforms[kind](sample.image), "key": sample.key}

            loader = make_loader(source, transform, batch, num_workers=workers, seed=SEED, repeat=True)
            start, seen = time.perf_counter(), 0
            for i, (b, _) in enumerate(loader):
                x = b["image"]
                if kind == "uint8":
                    x = (x.float() / 255 - mean) / std
                sizes[kind] = b["image"].numel() * b["image"].element_size()
                seen += x.shape[0]
                if i + 1 == batches:
                    break
            return seen / (time.perf_counter() - start)

        return once

    uint8, fp32 = alternate(measure("uint8"), measure("fp32"), rounds)
    u, f = max(uint8), max(fp32)
    return Part(
        name="u", title="loader: uint8 batches, normalised after the workers, vs fp32 batches",
        baseline="open_clip's float transform in the workers (ToTensor + Normalize)",
        figures=[
            Figure("loader images/s", "images/s", u, f, u / f, "uint8 / fp32", 1.0),
            Figure("bytes per batch through shared memory", "MiB", sizes["uint8"] / 2**20, sizes["fp32"] / 2**20,
                   sizes["uint8"] / sizes["fp32"], "uint8 / fp32", 0.25, higher_is_better=False),
        ],
        details={"images": n, "batch": batch, "workers": workers, "batches": batches, "rounds": rounds, "arch": arch,
                 "uint8_images_per_s": uint8, "fp32_images_per_s": fp32},
    )
