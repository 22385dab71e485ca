"""`make gpu-check`'s step checks: `torch.compile` against eager over three steps of the training
loop (compile), and contrast-tune's step at batch 256 in bf16 with its FLOPs and MFU (throughput);
the aligner, step and batches they train are also what the recipe rows build on."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vla.gpucheck import Sizes

#: dense bf16 peak FLOP/s by device name (NVIDIA's data sheets), for MFU; `--peak-tflops` overrides
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10": 125e12}


def aligner(arch: str, embed_dim: int, teacher: bool):
    import torch

    from vla.losses import LogitScale
    from vla.models.proclip.adapter import Adapter, AdapterConfig
    from vla.models.clip import load_clip
    from vla.models.proclip.ema import make_ema_teacher
    from vla.models.proclip import ImageTextAligner

    torch.manual_seed(0)
    clip = load_clip(arch)  # a bare architecture name: random init, no weights
    visual = clip.model.visual
    adapter = Adapter.from_config(AdapterConfig.llm2clip(embed_dim, clip.embed_dim))
    model = ImageTextAligner(visual, adapter, LogitScale(), make_ema_teacher(visual) if teacher else None)
    return model.train(), clip.image_size if isinstance(clip.image_size, int) else clip.image_size[0]


def contrast_step(use_reg: bool):
    from vla.losses import ClipLoss, self_distillation_loss

    loss_fn = ClipLoss()

    def step(m, batch):
        img, txt, scale, img_t = m(batch["image"], batch["phi"])
        loss = loss_fn(img, txt, scale)
        if use_reg:
            loss = loss + self_distillation_loss(img, img_t)["loss"]
        return {"loss": loss}

    return step


def synthetic_batches(batch: int, size: int, dim: int, device: str):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, size, size, device=device, generator=g)
    phi = torch.randn(batch, dim, device=device, generator=g)

    def batches(_start: int):
        while True:
            yield {"image": images, "phi": phi}

    return batches


def check_compile(s: Sizes, work: Path) -> str:
    import torch

    from vla.train import TrainConfig, train

    backend = "inductor" if s.device == "cuda" else "eager"
    losses = {}
    for compiled in (False, True):
        model, size = aligner("vla-micro-clip", s.embed_dim, teacher=True)
        cfg = TrainConfig(steps=3, warmup_steps=0, lr=1e-4, precision=s.precision, device=s.device,
                          compile=compiled, log_every=1, checkpoint_every=1000)
        real = torch.compile
        with _patched(torch, "compile", lambda m, **kw: real(m, backend=backend, **kw)):
            out = work / f"compile-{compiled}"
            train(cfg, model, contrast_step(True), synthetic_batches(16, size, s.embed_dim, s.device), out)
        losses[compiled] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    tol = 5e-2 if s.precision == "bf16" else 1e-4
    diff = max(abs(a - b) for a, b in zip(losses[False], losses[True]))
    if len(losses[True]) != 3 or diff > tol:
        raise RuntimeError(f"compiled losses {losses[True]} vs eager {losses[False]} (tolerance {tol})")
    return f"torch.compile ({backend}) = eager over 3 steps (max |Δloss| {diff:.2e})"


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def peak_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16.items():  # longest names first in the table where they overlap
        if key in device_name:
            return peak
    return None


def check_throughput(s: Sizes, work: Path, peak_override: float | None) -> tuple[str, dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vla.train import TrainConfig, train

    model, size = aligner(s.throughput_arch, s.embed_dim, teacher=True)
    model.to(s.device)
    batches = synthetic_batches(s.throughput_batch, size, s.embed_dim, s.device)
    step = contrast_step(True)
    autocast = torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    with FlopCounterMode(display=False) as counter:  # one step's model FLOPs, measured
        with autocast:
            out = step(model, next(batches(0)))
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()
    cfg = TrainConfig(steps=s.throughput_steps, warmup_steps=0, lr=1e-5, precision=s.precision,
                      device=s.device, checkpoint_every=10**6, log_every=10**6)
    result = train(cfg, model, step, batches, work / "throughput")
    sps = result.samples_per_s
    name = torch.cuda.get_device_name() if s.device == "cuda" else "cpu"
    peak = peak_override or (peak_flops(name) if s.device == "cuda" else None)
    achieved = flops_per_step * sps / s.throughput_batch
    mfu = achieved / peak if peak else None
    details = {"arch": s.throughput_arch, "batch": s.throughput_batch, "steps": s.throughput_steps,
               "precision": s.precision, "device_name": name, "samples_per_s": sps,
               "flops_per_sample": flops_per_step / s.throughput_batch, "achieved_flops": achieved,
               "peak_flops": peak, "mfu": mfu}
    summary = (f"{s.throughput_arch} contrast-tune, batch {s.throughput_batch} {s.precision}: {sps:,.0f} samples/s, "
               f"{flops_per_step / s.throughput_batch / 1e9:.3g} GFLOP/sample, "
               + (f"MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s" if mfu is not None else "MFU n/a (no known peak)"))
    return summary, details
