"""Part a: training throughput of `vla pretrain` against open_clip's own trainer, like for like.

Both train `vla-tiny-clip` from scratch on the same WebDataset shards of the synthetic world, for
the same number of steps, with the same batch, precision (fp32 on CPU), optimizer (AdamW, betas
0.9/0.98, eps 1e-6, weight decay 0.1), gradient clipping (1.0), warmup + cosine schedule and one
DataLoader worker. Each runs in its own process; the full run measures each side three times in
the order vla, open_clip, open_clip, vla, vla, open_clip (so that a drift in the machine's load
favours neither side).

What is compared is the time of one training step, end of one step to the end of the next, data
wait included: vla logs every step (`train.log_every=1`: metrics.jsonl's samples/s of a
one-step window) and open_clip is run with `--log-every-n-steps 1`, whose per-step "Batch (t)"
is the same span. The first step (warm-up) is left out on both sides. The figure is the batch
divided by the median of all of a side's step times, pooled over its runs: on a shared 2-core
machine single steps swing by ±15% with neighbours' load, and the median is what a burst moves
least. The mean-based figure (all steps' samples over all steps' time) is kept beside it in the
JSON.

The wrapper below also makes two known incompatibilities harmless without changing what is
measured: open_clip_train imports pandas for its CSV datasets only (where pandas is not installed,
an empty module stands in; the webdataset path never touches it), and webdataset >= 0.2.96 ends
each shard with an `{}` marker that open_clip_train's grouping cannot read (webdataset#384,
open_clip#935); the fix given there, `eof_value=None`, is applied.

    python -m vla.bench.trainer <open_clip_train arguments>   # the wrapper: vla's configs + main()
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from vla.bench import BENCH_DIR, bench_world, Figure, Part

BATCH = 128
LR = 5e-4
WARMUP = 10
MODEL = "vla-tiny-clip"
GOAL = 1.25          # vla's step against open_clip_train's, same model, batch, precision and optimizer
WORLD_TRAIN = 6000   # synthetic training pairs: enough for 40 steps of 128 without repeating
SHARD_SIZE = 500     # part b trains on one shard: its feature cache fill stays short
# "Train Epoch: 0 [  256/5120 (5%)] Data (t): 0.012 Batch (t): 0.850, 150.6/s, 150.6/s/gpu ..."
_BATCH_TIME = re.compile(r"Batch \(t\): ([\d.]+),")


def ensure_world() -> Path:
    """The benchmark's synthetic world (bench/world), generated once and reused."""
    from vla.data.synth import SynthConfig

    # 64 px stored: this part compares trainers, not source sizes (part h measures those)
    return bench_world("world", SynthConfig(n_train=WORLD_TRAIN, n_val=0, n_test=100, shard_size=SHARD_SIZE,
                                            yolo_train=0, image_size=64))


def _env() -> dict[str, str]:
    # offline (no hub retries), no progress bar: both sides log to files, not to a terminal
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1", "WANDB_MODE": "disabled"}


def _check(proc: subprocess.CompletedProcess, who: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{who} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def vla_command(world: Path, steps: int, out: Path, compile: bool = False) -> list[str]:
    """`vla pretrain`'s command line for part a (`compile`: with `train.compile=true`)."""
    sets = {"model": MODEL, "train.steps": steps, "train.batch_size": BATCH, "train.lr": LR,
            "train.warmup_steps": WARMUP, "train.precision": "fp32", "train.device": "cpu",
            "train.grad_clip": 1.0, "train.weight_decay": 0.1, "data.num_workers": 1,
            "train.log_every": 1, "eval.sets": "[]", "train.compile": str(compile).lower()}
    return [sys.executable, "-m", "vla", "pretrain", "--data", str(world / "train"), "--out", str(out),
            "--force", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def run_vla(world: Path, steps: int, compile: bool = False) -> dict:
    out = BENCH_DIR / "runs" / "pretrain"
    for stale in (out, out.parent / f".{out.name}.partial"):  # never resume an earlier run
        shutil.rmtree(stale, ignore_errors=True)
    cmd = vla_command(world, steps, out, compile)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    _check(proc, "vla pretrain")
    manifest = json.loads((out / "manifest.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # a one-step window's rate; step 1 has none (the clock starts when it ends)
    per_step = [BATCH / r["samples_per_s"] for r in records if r["samples_per_s"]]
    if len(per_step) != steps - 1:
        raise RuntimeError(f"vla logged {len(per_step)} step times, expected {steps - 1}")
    return {"samples_per_s": manifest["timings"]["samples_per_s"], "steps": manifest["counts"]["train"]["steps"],
            "step_seconds": per_step, "process_wall_s": time.perf_counter() - start, "command": cmd}


def open_clip_argv(world: Path, steps: int, logs: Path, name: str) -> list[str]:
    """open_clip_train's arguments for part a."""
    shards = sorted(p.stem for p in (world / "train").glob("*.tar"))
    argv = ["--train-data", str(world / "train" / f"{{{shards[0]}..{shards[-1]}}}.tar"),
            "--dataset-type", "webdataset", "--train-num-samples", str(steps * BATCH),
            "--batch-size", str(BATCH), "--epochs", "1", "--workers", "1", "--model", MODEL,
            "--precision", "fp32", "--lr", str(LR), "--warmup", str(WARMUP), "--wd", "0.1",
            "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0",
            "--report-to", "", "--logs", str(logs), "--name", name, "--log-every-n-steps", "1",
            "--save-frequency", "0", "--device", "cpu", "--seed", "0"]
    return argv


def run_open_clip(world: Path, steps: int) -> dict:
    logs, name = BENCH_DIR / "openclip_logs", "bench"
    shutil.rmtree(logs / name, ignore_errors=True)  # open_clip refuses an existing experiment
    argv = open_clip_argv(world, steps, logs, name)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vla.bench.trainer", *argv], capture_output=True,
                          text=True, env=_env())
    _check(proc, "open_clip_train")
    log = (logs / name / "out.log").read_text()
    per_step = [float(t) for t in _BATCH_TIME.findall(log)]
    if len(per_step) != steps:
        raise RuntimeError(f"open_clip_train logged {len(per_step)} of {steps} steps; log:\n{log[-3000:]}")
    return {"samples_per_s": BATCH * (steps - 1) / sum(per_step[1:]), "steps": steps,
            "step_seconds": per_step[1:], "process_wall_s": time.perf_counter() - start,
            "argv": argv}


def run(quick: bool) -> Part:
    steps = 15 if quick else 40
    world = ensure_world()
    sides = {"vla": lambda: run_vla(world, steps), "open_clip": lambda: run_open_clip(world, steps),
             "vla_compiled": lambda: run_vla(world, steps, compile=True)}
    runs: dict[str, list] = {side: [] for side in sides}
    for r in range(1 if quick else 3):  # vla, open_clip, compiled; then the reverse; …
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            runs[side].append(sides[side]())
    median = {side: BATCH / statistics.median(t for r in rs for t in r["step_seconds"]) for side, rs in runs.items()}
    mean = {side: BATCH * sum(len(r["step_seconds"]) for r in rs) / sum(sum(r["step_seconds"]) for r in rs)
            for side, rs in runs.items()}
    # the spread: each round's ratio (its vla run's median step against its open_clip run's)
    per_round = {side: [statistics.median(o["step_seconds"]) / statistics.median(v["step_seconds"])
                        for v, o in zip(runs[side], runs["open_clip"])] for side in ("vla", "vla_compiled")}
    spread = "; ".join(f"{name} {min(per_round[side]):.2f}–{max(per_round[side]):.2f}×"
                       for side, name in (("vla", "eager"), ("vla_compiled", "compiled")))
    part = Part("a", f"pretrain {MODEL}, batch {BATCH}, fp32, {steps} steps × {len(runs['vla'])} runs; "
                     f"ratio per round {spread}", "open_clip_train")
    part.figures = [Figure("training throughput", "samples/s", median["vla"], median["open_clip"],
                           median["vla"] / median["open_clip"], "vla / baseline", GOAL),
                    Figure("training throughput, train.compile", "samples/s", median["vla_compiled"],
                           median["open_clip"], median["vla_compiled"] / median["open_clip"], "vla / baseline", GOAL)]
    part.details = {"steps": steps, "batch": BATCH, "model": MODEL, "world_train_pairs": WORLD_TRAIN,
                    "warmup_excluded_steps": 1, "figure": "batch / median step time, steps pooled over runs",
                    "samples_per_s_from_median_step": median, "samples_per_s_from_mean_step": mean,
                    "ratio_from_mean_step": mean["vla"] / mean["open_clip"], "ratio_per_round": per_round,
                    **runs}
    return part


def open_clip_main(argv: list[str]) -> None:
    """open_clip_train's entry point with vla's model configs registered."""
    import functools
    import importlib.util
    import types

    import open_clip  # before the pandas stand-in: torch's import machinery probes for pandas

    from vla.models.clip import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    if importlib.util.find_spec("pandas") is None:
        sys.modules["pandas"] = types.ModuleType("pandas")
    import open_clip_train.data as oc_data
    from open_clip_train.main import main

    oc_data.tar_file_expander = functools.partial(oc_data.tar_file_expander, eof_value=None)
    main(argv)


if __name__ == "__main__":
    open_clip_main(sys.argv[1:])
