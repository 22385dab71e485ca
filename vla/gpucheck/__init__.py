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

Checks 1-6 and the driver are here; 7-8 are in `vla.gpucheck.steps`, 9 in `vla.gpucheck.recipes`.
"""

from __future__ import annotations

import argparse
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
         "--out", str(runs / "distill"), "--recipe", str(SMOKE / "proclip" / "distill.yaml"), "--force", *on,
         "--set", "val_rows=8", "--set", "embedder.max_length=64")
    _vla("contrast-tune", "--data", str(world), "--init", str(runs / "distill"), "--out", str(runs / "contrast"),
         "--recipe", str(SMOKE / "proclip" / "contrast-tune.yaml"), "--force", *on, *evals,
         "--set", "train.grad_checkpointing=true")
    _vla("contrast-tune", "--data", str(world), "--init", "random", "--clip", str(runs / "clip"),
         "--embedder", s.embedder, "--out", str(runs / "llm2clip"), "--recipe", str(SMOKE / "proclip" / "llm2clip.yaml"),
         "--force", *on, *evals, "--set", "embedder.max_length=64")
    _vla("eval", str(runs / "clip"), str(runs / "llm2clip"), str(runs / "contrast"), "--data", str(world),
         "--out", str(runs / "eval"), "--recipe", str(SMOKE / "proclip" / "eval.yaml"), "--force",
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
        _vla("train-detector", "--data", str(world), "--out", detector, "--recipe", str(SMOKE / "dclip" / "train-detector.yaml"),
             "--force", "--set", "device=0")
    _vla("precompute-regions", "--data", str(world), "--detector", detector, "--clip", str(runs / "clip"),
         "--out", str(d / "regions"), "--recipe", str(SMOKE / "dclip" / "precompute-regions.yaml"), "--force",
         "--set", f"device={s.device}")
    _vla("train-teacher", "--regions", str(d / "regions"), "--out", str(d / "teacher"), "--recipe",
         str(SMOKE / "dclip" / "train-teacher.yaml"), "--force", *on)
    _vla("train-student", "--teacher", str(d / "teacher"), "--out", str(d / "student"), "--recipe",
         str(SMOKE / "dclip" / "train-student.yaml"), "--force", *on, "--set", f"train.steps={s.steps}",
         "--set", f"eval.sets={s.eval_sets}")
    _vla("eval", str(runs / "clip"), str(d / "student"), "--data", str(world), "--out", str(d / "eval"),
         "--recipe", str(SMOKE / "proclip" / "eval.yaml"), "--force", "--set", f"sets={s.eval_sets}", "--set", f"device={s.device}")
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
    _vla("joint-train", "--data", str(world), "--out", str(m / "joint"), "--recipe", str(SMOKE / "mmgem" / "joint-train.yaml"),
         "--force", *on, "--set", "eval.sets=[]")
    _vla("stage2-roi", "--data", str(world), "--init", str(m / "joint"), "--out", str(m / "stage2"), "--recipe",
         str(SMOKE / "mmgem" / "stage2-roi.yaml"), "--force", *on)
    _vla("eval", str(m / "stage2"), "--data", str(world), "--out", str(m / "eval"), "--recipe",
         str(SMOKE / "mmgem" / "eval-mmgem.yaml"), "--force", "--set", f"device={s.device}",
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
          "--out", str(work / "ddp-distill"), "--recipe", str(SMOKE / "proclip" / "distill.yaml"), *on,
          "--set", "val_rows=8", "--set", "embedder.max_length=64"])
    _run([*torchrun, "contrast-tune", "--data", str(world), "--init", str(runs / "distill"),
          "--out", str(work / "ddp-contrast"), "--recipe", str(SMOKE / "proclip" / "contrast-tune.yaml"), *on,
          "--set", "eval.sets=[]"])
    m = _manifest(work / "ddp-contrast")
    want = s.steps * s.batch * n
    if m["counts"]["train"]["samples"] != want or not m["device"].startswith(s.device):
        raise RuntimeError(f"contrast-tune under torchrun: {m['counts']['train']['samples']} samples on "
                           f"{m['device']}, expected {want} on {s.device}")
    backend = "nccl" if s.device == "cuda" else "gloo"
    note = "" if n > 1 else " (1 GPU: one rank, no collective exercised; NCCL needs 2+ GPUs)"
    return f"{n} ranks ({backend if n > 1 else 'no process group'}): distill + contrast-tune, one artifact each{note}"


from vla.gpucheck.recipes import check_recipes  # noqa: E402
from vla.gpucheck.steps import check_compile, check_throughput, peak_flops  # noqa: E402,F401


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
