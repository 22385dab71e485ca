"""`make gpu-check`: the checks only a GPU machine can make, in one command, meant to fit in 10 minutes.

    python -m vla.gpucheck                 # on a CUDA machine; without a usable GPU it fails, saying why
    python -m vla.gpucheck --device cpu    # the same logic at tiny sizes on the CPU (the suite's self-test)

Nine checks, one table, one JSON (`--out`, default runs/gpu-check/gpu-check.json):
1. cuda-tests: the test suite's `cuda`-marked tests (device placement of distill, contrast-tune
   and eval; a bf16 autocast step), `pytest -m cuda`.
2. curriculum: the smoke ProCLIP curriculum (synth → pretrain → distill → contrast-tune →
   LLM2CLIP → eval) through the CLI, trained in bf16; every manifest must say where it trained.
3. dclip: the smoke DCLIP chain on that world and base CLIP: a YOLO detector trained on the GPU
   (the oracle boxes in the CPU self-test, whose world has no YOLO copy) → regions → meta-teacher
   → student → eval, in bf16.
4. mmgem: the smoke MM-GEM chain: joint-train → stage2-roi → eval with captioning (generation
   through the LM's KV cache), in bf16.
5. torchrun: `torchrun --nproc-per-node N` (N = every visible GPU, NCCL; 2 gloo ranks on the
   CPU) of distill and contrast-tune: one artifact counting every rank's samples. With one GPU
   the launcher runs one rank and no collective is exercised: the row says so.
6. invariance: the world-size invariance harness (tests/test_invariance.py: 2 ranks = 1 process
   for every training stage) on 2 GPUs with NCCL when there are 2 or more (one stage of it, with
   gloo, in the CPU self-test).
7. compile: three steps of the training loop with `train.compile` against the same steps eager
   (inductor on the GPU; on the CPU dynamo's tracing with the eager backend, as inductor's C++
   build would take minutes there): the losses must agree.
8. throughput: contrast-tune's training step on open_clip's ViT-B-16 (random init, no weights)
   with an LLM2CLIP adapter from 1024-d features and the frozen teacher tower, batch 256, bf16:
   samples/s, and MFU = FLOPs counted by torch's FlopCounterMode for one step (forward and
   backward of the student, forward of the teacher) × steps/s ÷ the GPU's dense bf16 peak.
9. recipes: one step of every real recipe at its real per-GPU batch on randomly initialised real
   architectures (ViT-L/14 and ViT-B/16 from open_clip's configs, Qwen3-Embedding-0.6B's and
   TinyLlama-1.1B's configs, YOLOv8x's yaml): samples/s and peak memory per GPU in a table of
   its own; an out-of-memory fails the row (tiny sizes on the CPU).
A GPU that is present but that torch cannot use (driver too old for its CUDA build) fails at once
in one line; so does a machine with no GPU (nothing was checked).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent.parent
SMOKE = ROOT / "recipes" / "smoke"
#: dense bf16 peak FLOP/s by device name (NVIDIA's data sheets), for MFU; `--peak-tflops` overrides
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "A10": 125e12}


@dataclass
class Check:
    name: str
    ok: bool = False
    seconds: float = 0.0
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sizes:
    """What each check runs at: real sizes on the GPU, tiny ones for the CPU self-test."""

    device: str
    precision: str
    synth: list[str]
    steps: int
    batch: int
    embedder: str
    eval_sets: str
    throughput_arch: str
    throughput_batch: int
    throughput_steps: int
    embed_dim: int                       # the frozen embedder's width the adapter reads (Qwen: 1024)


def sizes_for(device: str) -> Sizes:
    if device == "cuda":
        return Sizes("cuda", "bf16", [], steps=6, batch=32, embedder="minilm",
                     eval_sets="[retrieval,long_retrieval,zeroshot]", throughput_arch="ViT-B-16",
                     throughput_batch=256, throughput_steps=30, embed_dim=1024)
    return Sizes("cpu", "fp32", ["--set", "n_train=48", "--set", "n_val=0", "--set", "n_test=64",
                                 "--set", "shard_size=24", "--set", "yolo_train=0"],
                 steps=2, batch=8, embedder="vla-tiny-qwen", eval_sets="[retrieval]",
                 throughput_arch="vla-micro-clip", throughput_batch=8, throughput_steps=3, embed_dim=32)


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "VLA_NO_PROGRESS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run(cmd: list[str], timeout: int = 480) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
        raise RuntimeError(f"{' '.join(cmd[:6])} … exited {proc.returncode}:\n{tail}")
    return proc


def _vla(*args: str) -> str:
    """`vla ARGS` through the CLI itself, in this process (stages share the imports: the CPU
    self-test would otherwise spend most of its time importing torch again for every stage)."""
    from typer.testing import CliRunner

    from vla.cli import app

    result = CliRunner().invoke(app, list(args), env={"VLA_NO_PROGRESS": "1"})
    if result.exit_code != 0:
        raise RuntimeError(f"vla {' '.join(args[:3])} … exited {result.exit_code}: {result.output[-2500:]}"
                           + (f" ({type(result.exception).__name__}: {result.exception})"
                              if result.exception and not isinstance(result.exception, SystemExit) else ""))
    return result.output


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / "manifest.json").read_text())


# ---------------------------------------------------------------------------------- the checks

def check_cuda_tests(s: Sizes, work: Path) -> str:
    # only the files that hold cuda-marked tests: collecting the whole suite costs half a minute
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in p.read_text())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=480)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode not in (0, 5):  # 5: none selected
        raise RuntimeError(f"pytest -m cuda: {last}\n{proc.stdout[-3000:]}")
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", last)) else 0
    skipped = int(m.group(1)) if (m := re.search(r"(\d+) skipped", last)) else 0
    if s.device == "cuda" and (passed == 0 or skipped):
        raise RuntimeError(f"pytest -m cuda on a GPU: {last}")
    return f"{passed} passed, {skipped} skipped" + ("" if s.device == "cuda" else " (no GPU: skipped by design)")


def check_curriculum(s: Sizes, work: Path) -> str:
    world, runs = work / "world", work / "runs"
    on = ["--set", f"train.precision={s.precision}", "--set", f"train.device={s.device}",
          "--set", f"train.steps={s.steps}", "--set", f"train.batch_size={s.batch}"]
    evals = ["--set", f"eval.sets={s.eval_sets}"]
    _vla("synth", "--out", str(world), "--recipe", str(SMOKE / "synth.yaml"), "--force", *s.synth)
    _vla("pretrain", "--data", str(world), "--out", str(runs / "clip"), "--recipe", str(SMOKE / "pretrain.yaml"),
         "--force", *on, *evals)
    _vla("distill", "--data", str(world), "--teacher", str(runs / "clip"), "--embedder", s.embedder,
         "--out", str(runs / "distill"), "--recipe", str(SMOKE / "distill.yaml"), "--force", *on,
         "--set", "val_rows=8", "--set", "embedder.max_length=64")
    _vla("contrast-tune", "--data", str(world), "--init", str(runs / "distill"), "--out", str(runs / "contrast"),
         "--recipe", str(SMOKE / "contrast-tune.yaml"), "--force", *on, *evals,
         "--set", "train.grad_checkpointing=true")
    _vla("contrast-tune", "--data", str(world), "--init", "random", "--clip", str(runs / "clip"),
         "--embedder", s.embedder, "--out", str(runs / "llm2clip"), "--recipe", str(SMOKE / "llm2clip.yaml"),
         "--force", *on, *evals, "--set", "embedder.max_length=64")
    _vla("eval", str(runs / "clip"), str(runs / "llm2clip"), str(runs / "contrast"), "--data", str(world),
         "--out", str(runs / "eval"), "--recipe", str(SMOKE / "eval.yaml"), "--force",
         "--set", f"sets={s.eval_sets}", "--set", f"device={s.device}")
    devices = {name: _manifest(runs / name).get("device", "?")
               for name in ("clip", "distill", "contrast", "llm2clip", "eval")}
    wrong = {k: v for k, v in devices.items() if not v.startswith(s.device)}
    if wrong:
        raise RuntimeError(f"stages ran off {s.device}: {wrong}")
    # eval rows are labelled by method and directory, e.g. "ProCLIP (contrast)"
    metrics = _manifest(runs / "eval")["metrics"]
    mr = next(v for k, v in metrics.items() if k == "contrast" or k.endswith("(contrast)"))["retrieval"]["mean_recall"]
    return f"6 stages on {s.device} in {s.precision}; ProCLIP retrieval mR {mr:.3f}"


def check_dclip(s: Sizes, work: Path) -> str:
    """DCLIP's smoke chain on the curriculum's world and base CLIP: a YOLO detector trained here
    (on the GPU), its regions, the meta-teacher, the student, eval; every manifest on the device."""
    world, runs = work / "world", work / "runs"
    if not (runs / "clip" / "manifest.json").exists():
        raise RuntimeError("needs the curriculum check's world and base CLIP")
    on = ["--set", f"train.precision={s.precision}", "--set", f"train.device={s.device}"]
    d = runs / "dclip"
    detector = "oracle"  # the CPU self-test's world has no YOLO copy: the synthetic boxes stand in
    if s.device == "cuda":
        detector = str(d / "detector")
        _vla("train-detector", "--data", str(world), "--out", detector, "--recipe", str(SMOKE / "train-detector.yaml"),
             "--force", "--set", "device=0")
    _vla("precompute-regions", "--data", str(world), "--detector", detector, "--clip", str(runs / "clip"),
         "--out", str(d / "regions"), "--recipe", str(SMOKE / "precompute-regions.yaml"), "--force",
         "--set", f"device={s.device}")
    _vla("train-teacher", "--regions", str(d / "regions"), "--out", str(d / "teacher"), "--recipe",
         str(SMOKE / "train-teacher.yaml"), "--force", *on)
    _vla("train-student", "--teacher", str(d / "teacher"), "--out", str(d / "student"), "--recipe",
         str(SMOKE / "train-student.yaml"), "--force", *on, "--set", f"train.steps={s.steps}",
         "--set", f"eval.sets={s.eval_sets}")
    _vla("eval", str(runs / "clip"), str(d / "student"), "--data", str(world), "--out", str(d / "eval"),
         "--recipe", str(SMOKE / "eval.yaml"), "--force", "--set", f"sets={s.eval_sets}", "--set", f"device={s.device}")
    devices = {name: _manifest(d / name).get("device", "?") for name in ("student", "eval")}
    wrong = {k: v for k, v in devices.items() if not v.startswith(s.device)}
    if wrong:
        raise RuntimeError(f"DCLIP stages ran off {s.device}: {wrong}")
    trained = "a YOLO trained here" if s.device == "cuda" else "the oracle boxes"
    return f"{trained} → regions → teacher → student → eval on {s.device} in {s.precision}"


def check_mmgem(s: Sizes, work: Path) -> str:
    """MM-GEM's smoke chain: joint-train, stage2-roi, and eval with captioning (generation through
    the LM's KV cache), on the device."""
    world, runs = work / "world", work / "runs"
    if not (world / "manifest.json").exists():
        raise RuntimeError("needs the curriculum check's world")
    on = ["--set", f"train.precision={s.precision}", "--set", f"train.device={s.device}",
          "--set", f"train.steps={s.steps}"]
    m = runs / "mmgem"
    _vla("joint-train", "--data", str(world), "--out", str(m / "joint"), "--recipe", str(SMOKE / "joint-train.yaml"),
         "--force", *on, "--set", "eval.sets=[]")
    _vla("stage2-roi", "--data", str(world), "--init", str(m / "joint"), "--out", str(m / "stage2"), "--recipe",
         str(SMOKE / "stage2-roi.yaml"), "--force", *on)
    _vla("eval", str(m / "stage2"), "--data", str(world), "--out", str(m / "eval"), "--recipe",
         str(SMOKE / "eval-mmgem.yaml"), "--force", "--set", f"device={s.device}",
         "--set", "sets=[retrieval,captioning]")
    devices = {name: _manifest(m / name).get("device", "?") for name in ("joint", "stage2", "eval")}
    wrong = {k: v for k, v in devices.items() if not v.startswith(s.device)}
    if wrong:
        raise RuntimeError(f"MM-GEM stages ran off {s.device}: {wrong}")
    metrics = _manifest(m / "eval")["metrics"]
    row = next(iter(metrics.values()))
    if "captioning" not in row:
        raise RuntimeError(f"eval wrote no captioning rows: {sorted(row)}")
    return f"joint-train → stage2-roi → eval (retrieval + captioning) on {s.device} in {s.precision}"


def check_invariance(s: Sizes, work: Path) -> str:
    """The world-size invariance harness (tests/test_invariance.py) on 2 ranks: NCCL on 2 GPUs
    (bf16 off: the harness compares fp32), gloo on the CPU."""
    import torch

    if s.device == "cuda" and torch.cuda.device_count() < 2:
        return "skipped: 1 GPU (the 2-rank check needs 2; the suite runs it with gloo on the CPU)"
    env = {**_env(), "VLA_INVARIANCE_DEVICE": s.device}
    # the CPU self-test runs one stage of it (the suite runs all of them)
    only = [] if s.device == "cuda" else ["-k", "pretrain or in_the_harness"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_invariance.py",
                           *only], cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        raise RuntimeError(f"invariance harness: {last}\n{proc.stdout[-3000:]}")
    which = "every training stage" if s.device == "cuda" else "pretrain (the suite runs every stage)"
    return f"2 ranks ({'nccl' if s.device == 'cuda' else 'gloo'}) = 1 process for {which}: {last}"


def check_torchrun(s: Sizes, work: Path) -> str:
    import torch

    world, runs = work / "world", work / "runs"
    if not (runs / "distill" / "manifest.json").exists():
        raise RuntimeError("needs the curriculum check's world and distill artifact")
    n = torch.cuda.device_count() if s.device == "cuda" else 2
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(n),
                "-m", "vla"]
    on = ["--set", f"train.precision={s.precision}", "--set", f"train.device={s.device}",
          "--set", f"train.steps={s.steps}", "--set", f"train.batch_size={s.batch}", "--force"]
    _run([*torchrun, "distill", "--data", str(world), "--teacher", str(runs / "clip"), "--embedder", s.embedder,
          "--out", str(work / "ddp-distill"), "--recipe", str(SMOKE / "distill.yaml"), *on,
          "--set", "val_rows=8", "--set", "embedder.max_length=64"])
    _run([*torchrun, "contrast-tune", "--data", str(world), "--init", str(runs / "distill"),
          "--out", str(work / "ddp-contrast"), "--recipe", str(SMOKE / "contrast-tune.yaml"), *on,
          "--set", "eval.sets=[]"])
    m = _manifest(work / "ddp-contrast")
    want = s.steps * s.batch * n
    if m["counts"]["train"]["samples"] != want or not m["device"].startswith(s.device):
        raise RuntimeError(f"contrast-tune under torchrun: {m['counts']['train']['samples']} samples on "
                           f"{m['device']}, expected {want} on {s.device}")
    backend = "nccl" if s.device == "cuda" else "gloo"
    note = "" if n > 1 else " (1 GPU: one rank, no collective exercised; NCCL needs 2+ GPUs)"
    return f"{n} ranks ({backend if n > 1 else 'no process group'}): distill + contrast-tune, one artifact each{note}"


def _aligner(arch: str, embed_dim: int, teacher: bool):
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


def _contrast_step(use_reg: bool):
    from vla.losses import ClipLoss, self_distillation_loss

    loss_fn = ClipLoss()

    def step(m, batch):
        img, txt, scale, img_t = m(batch["image"], batch["phi"])
        loss = loss_fn(img, txt, scale)
        if use_reg:
            loss = loss + self_distillation_loss(img, img_t)["loss"]
        return {"loss": loss}

    return step


def _synthetic_batches(batch: int, size: int, dim: int, device: str):
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
        model, size = _aligner("vla-micro-clip", s.embed_dim, teacher=True)
        cfg = TrainConfig(steps=3, warmup_steps=0, lr=1e-4, precision=s.precision, device=s.device,
                          compile=compiled, log_every=1, checkpoint_every=1000)
        real = torch.compile
        with _patched(torch, "compile", lambda m, **kw: real(m, backend=backend, **kw)):
            out = work / f"compile-{compiled}"
            train(cfg, model, _contrast_step(True), _synthetic_batches(16, size, s.embed_dim, s.device), out)
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

    model, size = _aligner(s.throughput_arch, s.embed_dim, teacher=True)
    model.to(s.device)
    batches = _synthetic_batches(s.throughput_batch, size, s.embed_dim, s.device)
    step = _contrast_step(True)
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


# ------------------------------------------------- one step of every real recipe, real architectures

#: the real architectures' configs (random init: no weights are downloaded), from their model cards'
#: config.json; the CPU self-test uses the tiny sizes beside them
QWEN3_EMBEDDING_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, vocab_size=151669, max_position_embeddings=32768,
                            rope_theta=1e6, tie_word_embeddings=True)
TINY_QWEN3 = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, vocab_size=512, max_position_embeddings=128)
TINYLLAMA_1_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)


@dataclass
class RecipeRow:
    """One real recipe's step: what it builds at real (cuda) and tiny (cpu) sizes."""

    name: str
    recipe: str          # the recipe file it stands for
    batch: tuple[int, int]  # per-GPU batch: (real, tiny)


RECIPE_ROWS = [
    RecipeRow("ProCLIP distill: Qwen3-Embedding-0.6B encode (bf16, 512 tokens)", "recipes/proclip/distill.yaml", (256, 2)),
    RecipeRow("ProCLIP distill: adapter step", "recipes/proclip/distill.yaml", (128, 4)),
    RecipeRow("ProCLIP contrast-tune: ViT-L/14 + adapter + EMA teacher", "recipes/proclip/contrast-tune.yaml", (512, 4)),
    RecipeRow("LLM2CLIP: ViT-L/14 + adapter", "recipes/proclip/llm2clip.yaml", (512, 4)),
    RecipeRow("DCLIP precompute-regions: YOLOv8x detect (640 px)", "recipes/dclip/precompute-regions.yaml", (32, 2)),
    RecipeRow("DCLIP train-teacher: meta-teacher (512-d, 8 heads)", "recipes/dclip/train-teacher.yaml", (256, 4)),
    RecipeRow("DCLIP train-student: ViT-B/16", "recipes/dclip/train-student.yaml", (256, 4)),
    RecipeRow("MM-GEM joint-train: ViT-L/14 + TinyLlama-1.1B (50 tokens, LAMB)", "recipes/mmgem/joint-train.yaml", (256, 4)),
]


def _train_rate(model, step, batch: dict, n: int, device: str, precision: str, **cfg) -> float:
    """samples/s of the training loop on one fixed batch (its first step left out)."""
    from vla.train import TrainConfig, train

    cfg = TrainConfig(steps=3, warmup_steps=0, lr=1e-5, precision=precision, device=device,
                      checkpoint_every=10**6, log_every=10**6, **cfg)

    def batches(_start: int):
        while True:
            yield batch

    with tempfile.TemporaryDirectory(prefix="vla-gpucheck-step-") as out:
        return train(cfg, model, step, batches, Path(out), samples_per_batch=lambda b: n).samples_per_s


def _infer_rate(fn, n: int, device: str, steps: int = 3) -> float:
    import torch

    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * n / (time.perf_counter() - start)


def _recipe_step(row: RecipeRow, s: Sizes) -> float:
    """Build `row`'s model at random init and run its step; samples/s."""
    import torch
    import torch.nn.functional as F

    real = s.device == "cuda"
    b = row.batch[0 if real else 1]
    dev, prec = s.device, s.precision
    g = torch.Generator().manual_seed(0)
    name = row.recipe.split("/")[-2] + "/" + row.name.split(":")[1].strip()
    if "encode" in row.name:
        from transformers import Qwen3Config, Qwen3Model

        cfg = Qwen3Config(**(QWEN3_EMBEDDING_0_6B if real else TINY_QWEN3))
        model = Qwen3Model(cfg).to(dev, torch.bfloat16 if real else torch.float32).eval()
        ids = torch.randint(cfg.vocab_size, (b, 512 if real else 16), generator=g).to(dev)

        @torch.no_grad()
        def encode():
            return model(input_ids=ids).last_hidden_state[:, -1]

        return _infer_rate(encode, b, dev)
    if "adapter step" in row.name:
        from vla.losses import distill_loss
        from vla.models.proclip.adapter import Adapter, AdapterConfig

        d_in, d_out = (1024, 768) if real else (32, 16)
        adapter = Adapter.from_config(AdapterConfig.proclip(d_in, d_out))
        batch = {k: torch.randn(b, d, generator=g) for k, d in (("phi", d_in), ("phi2", d_in), ("u", d_out), ("u2", d_out))}

        def step(m, bt):
            return distill_loss(F.normalize(m(bt["phi"]), dim=-1), F.normalize(bt["u"], dim=-1),
                                F.normalize(m(bt["phi2"]), dim=-1), F.normalize(bt["u2"], dim=-1))

        return _train_rate(adapter, step, batch, b, dev, prec)
    if "ViT-L/14 + adapter" in row.name:
        model, size = _aligner("ViT-L-14" if real else "vla-micro-clip", s.embed_dim, teacher="EMA" in row.name)
        batch = next(_synthetic_batches(b, size, s.embed_dim, "cpu")(0))
        return _train_rate(model, _contrast_step("EMA" in row.name), batch, b, dev, prec, grad_checkpointing=True)
    if "YOLOv8x" in row.name:
        from ultralytics import YOLO

        net = YOLO("yolov8x.yaml" if real else "yolov8n.yaml").model.to(dev).eval()
        px = 640 if real else 64
        images = torch.rand(b, 3, px, px, generator=g).to(dev)

        @torch.no_grad()
        def detect():
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=real):
                return net(images)

        return _infer_rate(detect, b, dev)
    if "meta-teacher" in row.name:
        from vla.losses import dclip_teacher_loss
        from vla.models.dclip import MetaTeacher, TeacherConfig

        d, heads, k, length = (512, 8, 11, 77) if real else (32, 2, 3, 8)
        teacher = MetaTeacher(TeacherConfig(dim=d, heads=heads)).train()
        batch = {"tokens": torch.randn(b, length, d, generator=g), "token_mask": torch.ones(b, length, dtype=torch.bool),
                 "text": torch.randn(b, d, generator=g), "regions": torch.randn(b, k, d, generator=g),
                 "region_mask": torch.ones(b, k, dtype=torch.bool), "conf": torch.rand(b, k, generator=g),
                 "area": torch.rand(b, k, generator=g)}

        def step(m, bt):
            emb = m(bt["tokens"], bt["token_mask"], bt["text"], bt["regions"], bt["region_mask"], bt["conf"], bt["area"])
            return {"loss": dclip_teacher_loss(emb, bt["text"])}

        return _train_rate(teacher, step, batch, b, dev, prec)
    if "ViT-B/16" in row.name:
        from vla.losses import dclip_student_loss
        from vla.models.clip import load_clip

        clip = load_clip("ViT-B-16" if real else "vla-micro-clip")
        visual = clip.model.visual.train()
        size = clip.image_size if isinstance(clip.image_size, int) else clip.image_size[0]
        batch = {"image": torch.randn(b, 3, size, size, generator=g),
                 "teacher": torch.randn(b, clip.embed_dim, generator=g), "text": torch.randn(b, clip.embed_dim, generator=g)}

        def step(m, bt):
            return dclip_student_loss(F.normalize(m(bt["image"]), dim=-1), bt["teacher"], F.normalize(bt["text"], dim=-1))

        return _train_rate(visual, step, batch, b, dev, prec)
    if "MM-GEM" in row.name:
        from vla.losses import ClipLoss
        from vla.models.mmgem.causal_lm import TinyLlamaSize
        from vla.models.mmgem import MMGEMConfig, build_mmgem
        from vla.models.mmgem.objective import MMGEMTrainer

        words = ["a", "red", "small", "dog", "runs", "on", "the", "green", "grass", "near", "two", "blue", "cars"]
        captions = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60 if real else 8)) for i in range(b)]
        size = TinyLlamaSize(**{**TINYLLAMA_1_1B, "vocab_size": 512}) if real else TinyLlamaSize()
        model = build_mmgem("ViT-L-14" if real else "vla-micro-clip", None, captions,
                            MMGEMConfig(prefix_length=1, max_text_tokens=50 if real else 16), lm_size=size)
        if real:  # TinyLlama's vocabulary, for the logits' real size (the tokenizer uses the first rows)
            model.lm.resize_token_embeddings(TINYLLAMA_1_1B["vocab_size"])
        trainer = MMGEMTrainer(model, "joint", ClipLoss()).train()
        px = model.tower.image_size
        px = px if isinstance(px, int) else px[0]
        batch = {"pixels": torch.randn(b, 3, px, px, generator=g), "captions": captions}

        def step(m, bt):
            return m(bt["pixels"], bt["captions"])

        return _train_rate(trainer, step, batch, b, dev, prec, optimizer="lamb")
    raise ValueError(f"no step for {name}")


def check_recipes(s: Sizes, work: Path) -> tuple[str, dict]:
    """One step of every real recipe at its real per-GPU batch on randomly initialised real
    architectures: samples/s and peak GPU memory per row; an out-of-memory fails the row."""
    import gc

    import torch

    rows, failed = [], []
    for row in RECIPE_ROWS:
        if s.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        entry = {"row": row.name, "recipe": row.recipe, "batch_per_gpu": row.batch[0 if s.device == "cuda" else 1]}
        try:
            entry["samples_per_s"] = round(_recipe_step(row, s), 1)
        except torch.OutOfMemoryError as err:
            entry["error"] = f"out of memory: {str(err).splitlines()[0][:200]}"
        except Exception as err:  # noqa: BLE001 - a row's failure is reported in the table
            entry["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        if s.device == "cuda":
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        gc.collect()
        rows.append(entry)
        if "error" in entry:
            failed.append(f"{row.name}: {entry['error']}")
    print("\n| recipe step | per-GPU batch | samples/s | peak GiB |\n|---|---:|---:|---:|")
    for e in rows:
        print(f"| {e['row']} | {e['batch_per_gpu']} | {e.get('samples_per_s', 'FAILED')} | {e.get('peak_gib', '-')} |")
    if failed:
        raise RuntimeError("; ".join(failed))
    return f"{len(rows)} recipe steps at their per-GPU batch on {s.device}", {"rows": rows}


# ---------------------------------------------------------------------------------- the driver

def run_checks(device: str, out: Path, peak_override: float | None = None,
               only: set[str] | None = None) -> list[Check]:
    s = sizes_for(device)
    work = Path(tempfile.mkdtemp(prefix="vla-gpucheck-"))
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("cuda-tests", lambda: check_cuda_tests(s, work)),
        ("curriculum", lambda: check_curriculum(s, work)),
        ("dclip", lambda: check_dclip(s, work)),
        ("mmgem", lambda: check_mmgem(s, work)),
        ("torchrun", lambda: check_torchrun(s, work)),
        ("invariance", lambda: check_invariance(s, work)),
        ("compile", lambda: check_compile(s, work)),
        ("throughput", lambda: check_throughput(s, work, peak_override)),
        ("recipes", lambda: check_recipes(s, work)),
    ]
    checks = []
    for name, fn in steps:
        if only and name not in only:
            continue
        c = Check(name)
        start = time.perf_counter()
        try:
            result = fn()
            c.summary, c.details = result if isinstance(result, tuple) else (result, {})
            c.ok = True
        except Exception as err:  # a failed check is a row of the table, not the end of the run
            c.summary = f"FAILED: {type(err).__name__}: {str(err).strip()[:1500]}"
        c.seconds = round(time.perf_counter() - start, 1)
        checks.append(c)
        print(f"  {'ok  ' if c.ok else 'FAIL'} {name} ({c.seconds:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "work_dir": str(work), "checks": [asdict(c) for c in checks]},
                              indent=1) + "\n")
    return checks


def print_table(checks: list[Check], device: str) -> None:
    print(f"\nvla gpu-check ({device})\n")
    print("| check | result | s | summary |\n|---|---|---:|---|")
    for c in checks:
        summary = c.summary.splitlines()[0] if c.summary else ""
        print(f"| {c.name} | {'ok' if c.ok else 'FAILED'} | {c.seconds:.0f} | {summary} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vla.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default): the real check; cpu: the same logic at tiny sizes (self-test)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check" / "gpu-check.json")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU, if not known")
    parser.add_argument("--only", default="", help="comma-separated checks to run (default: all)")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        from vla.distributed import unusable_gpu_message

        unusable = unusable_gpu_message()
        if unusable:  # the case that must never pass: a GPU is there, torch cannot use it
            print(f"gpu-check FAILED: {unusable}")
        else:
            print("gpu-check FAILED: no CUDA GPU is visible here (no /dev/nvidia*, no nvidia-smi), so nothing "
                  "was checked; run it on a GPU machine (`python -m vla.gpucheck --device cpu` self-tests the "
                  "script at tiny sizes).")
        return 1
    start = time.perf_counter()
    checks = run_checks(args.device, args.out, args.peak_tflops * 1e12 if args.peak_tflops else None,
                        {x for x in args.only.split(",") if x} or None)
    print_table(checks, args.device)
    print(f"\n{sum(c.ok for c in checks)}/{len(checks)} checks passed in {time.perf_counter() - start:.0f} s; "
          f"JSON: {args.out}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
