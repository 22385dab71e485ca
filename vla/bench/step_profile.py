"""Where a training step's time goes: `vla pretrain` and open_clip_train on part a's model and data.

    python -m vla.bench.step_profile [--steps 14] [--skip 4]

Each trainer runs in its own process, through its own entry point, with part a's settings
(`vla.bench.trainer`), under torch.profiler. Both processes get the same instrumentation before
their trainer starts: a `record_function` span around the phases every such step has, wherever
the trainer calls them:

    data wait   the DataLoader iterator's `__next__` (the worker's batch not ready yet)
    forward     the CLIP's forward (both towers, the features, the logit scale)
    loss        the contrastive loss
    backward    `Tensor.backward`
    clip        `clip_grad_norm_`
    optimizer   `Optimizer.step` (AdamW), and `zero_grad`

"other" is the rest of the step (the trainer's own bookkeeping, logging, the uint8 → float
normalisation where it is outside the forward). Host syncs are the profiler's count of
`aten::_local_scalar_dense` (what `.item()` / `.tolist()` / `float(t)` run). Steps `skip`+1 …
`steps` are profiled (the first are warm-up); figures are milliseconds per step, means over
those steps. The profiler costs both sides alike (a few percent); the step times of part a are
measured without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PHASES = ("data wait", "forward", "loss", "backward", "clip", "optimizer")


def _instrument(out: Path, skip: int, steps: int) -> None:
    """Wrap the phases in record_function spans; profile steps skip+1 … steps; on the last one,
    write the breakdown to `out` (JSON)."""
    import torch
    import torch.utils.data.dataloader as dl
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    def spanned(name, fn):
        def wrapper(*a, **kw):
            with record_function(f"## {name}"):
                return fn(*a, **kw)
        wrapper.__wrapped__ = fn
        return wrapper

    import open_clip.loss
    import open_clip.model

    import vla.losses

    for cls in (open_clip.model.CLIP, open_clip.model.CustomTextCLIP):
        cls.forward = spanned("forward", cls.forward)
    for cls in (open_clip.loss.ClipLoss, vla.losses.ClipLoss):
        cls.forward = spanned("loss", cls.forward)
    for cls in (dl._SingleProcessDataLoaderIter, dl._MultiProcessingDataLoaderIter):
        cls.__next__ = spanned("data wait", cls.__next__)
    torch.Tensor.backward = spanned("backward", torch.Tensor.backward)
    torch.nn.utils.clip_grad_norm_ = spanned("clip", torch.nn.utils.clip_grad_norm_)
    torch.optim.Optimizer.zero_grad = spanned("optimizer", torch.optim.Optimizer.zero_grad)

    prof = profile(activities=[ProfilerActivity.CPU],
                   schedule=schedule(wait=skip, warmup=1, active=steps - skip - 1, repeat=1),
                   on_trace_ready=lambda p: _write(p, out, steps - skip - 1))
    state = {"step": 0, "t": None, "times": []}
    step_fn = torch.optim.AdamW.step

    def step(self, *a, **kw):
        with record_function("## optimizer"):
            result = step_fn(self, *a, **kw)
        state["step"] += 1
        now = time.perf_counter()
        if state["t"] is not None and state["step"] > skip + 1:
            state["times"].append(now - state["t"])
        state["t"] = now
        if state["step"] == 1:
            prof.start()
        if state["step"] <= steps:
            prof.step()
        if state["step"] == steps:
            prof.stop()
            out.with_suffix(".steps.json").write_text(json.dumps(state["times"]))
        return result

    torch.optim.AdamW.step = step


def _write(prof, out: Path, n: int) -> None:
    events = prof.key_averages()
    spans = {e.key[3:]: e.cpu_time_total / 1e3 / n for e in events if e.key.startswith("## ")}
    syncs = sum(e.count for e in events if e.key == "aten::_local_scalar_dense") / n
    ops = sorted((e for e in events if e.key.startswith(("aten::", "mkldnn::"))), key=lambda e: -e.self_cpu_time_total)
    top = [(e.key, e.self_cpu_time_total / 1e3 / n) for e in ops[:12]]
    out.write_text(json.dumps({"spans_ms": spans, "host_syncs": syncs, "top_ops_ms": top}))


def _child(side: str, out: Path, skip: int, steps: int, argv: list[str]) -> None:
    _instrument(out, skip, steps)
    if side == "open_clip":
        from vla.bench.trainer import open_clip_main

        open_clip_main(argv)
    else:
        sys.argv = ["vla", *argv]
        from vla.cli import main

        main()


def profile_side(side: str, world: Path, steps: int, skip: int) -> dict:
    from vla.bench import BENCH_DIR
    from vla.bench import trainer

    out = BENCH_DIR / "profile" / f"{side}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    import shutil

    if side == "vla":
        runs = BENCH_DIR / "profile" / "runs"
        cmd = trainer.vla_command(world, steps + 1, runs / "pretrain")[3:]  # after `python -m vla`
    else:
        runs = BENCH_DIR / "profile" / "openclip_logs"
        cmd = trainer.open_clip_argv(world, steps + 1, runs, "profile")
    shutil.rmtree(runs, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "vla.bench.step_profile", "--child", side, str(out),
                           str(skip), str(steps), *cmd], capture_output=True, text=True, env=trainer._env())
    trainer._check(proc, f"{side} (profiled)")
    result = json.loads(out.read_text())
    times = json.loads(out.with_suffix(".steps.json").read_text())
    result["step_ms"] = 1e3 * sum(times) / len(times)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        side, out, skip, steps, *argv = sys.argv[2:]
        return _child(side, Path(out), int(skip), int(steps), argv)
    parser = argparse.ArgumentParser(prog="python -m vla.bench.step_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--skip", type=int, default=4)
    args = parser.parse_args()
    from vla.bench import trainer

    world = trainer.ensure_world()
    results = {side: profile_side(side, world, args.steps, args.skip) for side in ("vla", "open_clip")}
    rows = [*PHASES, "other", "step"]
    print(f"ms per step (steps {args.skip + 1}-{args.steps}), {os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f}")
    print(f"| phase | {' | '.join(results)} |\n|---|" + "---:|" * len(results))
    for row in rows:
        cells = []
        for r in results.values():
            if row == "step":
                v = r["step_ms"]
            elif row == "other":
                v = r["step_ms"] - sum(r["spans_ms"].get(p, 0.0) for p in PHASES)
            else:
                v = r["spans_ms"].get(row, 0.0)
            cells.append(f"{v:.1f}")
        print(f"| {row} | {' | '.join(cells)} |")
    syncs = " | ".join(f"{r['host_syncs']:.1f}" for r in results.values())
    print(f"| host syncs / step | {syncs} |")
    for side, r in results.items():
        print(f"\n{side}: top ops by self time (ms/step): "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["top_ops_ms"]))


if __name__ == "__main__":
    main()
