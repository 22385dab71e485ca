"""World-size invariance: every training stage trains the same on 2 gloo ranks as in one
process, on the same global batch.

What "the same" means, and how it is measured, over the first STEPS optimizer steps: each step's
logged loss (the mean over ranks that the loop all-reduces), AdamW's first moment of every trained
tensor after the last step (exp_avg = (1 − β1)·Σ_s β1^(STEPS−s)·g_s: a fixed linear mix of the
steps' gradients, read from the checkpoint, unclipped: the harness turns `grad_clip` off and uses
AdamW in every stage), and the parameters after the steps. A loss term that silently depends on
the rank count (a per-rank sum, pairs within a rank only, a local InfoNCE, a per-rank token mean)
changes the gradient by a factor or a term, which Adam's normalised update would hide in the
parameters alone, so the gradient is the main check. Two steps, not one: ProCLIP's `L_reg`
compares the image tower with its copy, which is zero at the first step and only then differs.

fp32 tolerances: |Δloss| ≤ 1e-5·max(1, |loss|) at each step; ‖m₂ − m₁‖ ≤ 1e-4·‖m₁‖ over all
trained tensors together; ‖θ₂ − θ₁‖ ≤ 1e-2·‖Δθ₁‖, Δθ₁ being the last step's Adam update
(lr·m̂/(√v̂ + ε)): Adam turns fp32 noise in a near-zero gradient element into an update of up to lr,
so the parameters get the looser bound, while a rank-count bug moves them by the order of the
update itself. `make gpu-check` runs the same harness on 2 GPUs (VLA_INVARIANCE_DEVICE=cuda:
NCCL, and TF32 matmuls, as the loop enables them on a GPU, hence 100× looser tolerances there).

The global batch: stages that take their batches from row indices (`row_batches`: the global
batch is split by rank) get the same `train.batch_size` at both sizes; stages that stream
image–text shards, whose `train.batch_size` is per rank and whose ranks read different shards,
train on a world of exactly one global batch (two shards of 8), so that 1 × 16 and 2 × 8 are the
same 16 samples (every loss here is invariant to the order of the batch).

The stage list is derived from the recipe registry: every kind whose recipe has a `train:` block
(the shared training loop) must have an entry in STAGES, so a new training stage cannot join
without its invariance test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from vla.stages import RECIPES, recipe_class
from vla.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("invariance_worker.py")
WORLD = 2
GLOBAL = 16  # the global batch; the world's training split is exactly this many samples
STEPS = 2
DEVICE = os.environ.get("VLA_INVARIANCE_DEVICE", "cpu")
#: (loss, gradient, parameters) relative tolerances; see the module docstring
TOL = (1e-5, 1e-4, 1e-2) if DEVICE == "cpu" else (1e-3, 1e-2, 1e-1)

SYNTH = ["--recipe", "recipes/smoke/synth.yaml", "--set", f"n_train={GLOBAL}", "--set", "n_val=0",
         "--set", "n_test=16", "--set", f"shard_size={GLOBAL // WORLD}", "--set", "yolo_train=0"]
TRAIN = ["--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=0", "--set", "train.grad_clip=null",
            "--set", "train.optimizer=adamw", "--set", "train.log_every=1", "--set", "train.checkpoint_every=1",
            "--set", f"train.device={DEVICE}", "--force"]
NO_EVAL = ["--set", "eval.sets=[]"]

#: stage → (its arguments given the world dir and the 1-rank runs dir, how train.batch_size counts, mark)
#: "global": the recipe's batch is the global batch (the same value at any rank count);
#: "rank": it is per rank (the global batch is world_size × it).
STAGES: dict[str, tuple] = {
    "pretrain": (lambda w, r: ["--data", w, "--recipe", "recipes/smoke/pretrain.yaml", *NO_EVAL], "rank", None),
    "distill": (lambda w, r: ["--data", w, "--teacher", r / "pretrain", "--embedder", "vla-tiny-qwen",
                              "--recipe", "recipes/smoke/proclip/distill.yaml", "--set", "val_rows=0",
                              "--set", "embedder.max_length=64"], "global", None),
    "contrast-tune": (lambda w, r: ["--data", w, "--init", r / "distill", "--recipe", "recipes/smoke/proclip/contrast-tune.yaml",
                                    "--set", "long_caption_prob=0.5", *NO_EVAL], "rank", None),
    "train-teacher": (lambda w, r: ["--regions", r / "regions", "--data", w, "--recipe", "recipes/smoke/dclip/train-teacher.yaml",
                                    "--set", f"epochs={STEPS}"], "global", None),
    "train-student": (lambda w, r: ["--teacher", r / "train-teacher", "--data", w,
                                    "--recipe", "recipes/smoke/dclip/train-student.yaml", "--set", "teacher_epoch=1",
                                    *NO_EVAL], "global", None),
    "pretrain-lm": (lambda w, r: ["--data", w, "--recipe", "recipes/smoke/mmgem/pretrain-lm.yaml"], "global", None),
    "joint-train": (lambda w, r: ["--data", w, "--recipe", "recipes/smoke/mmgem/joint-train.yaml", *NO_EVAL], "rank", None),
    "stage2-roi": (lambda w, r: ["--data", w, "--init", r / "joint-train", "--recipe", "recipes/smoke/mmgem/stage2-roi.yaml"],
                   "rank", None),
}
#: what the 1-rank run builds before the stages that read it (same inputs for both runs)
SETUP = {"regions": lambda w, r: ["precompute-regions", "--data", w, "--detector", "oracle", "--clip", r / "pretrain",
                                  "--set", "detect.imgsz=64", "--set", "shard_size=16", "--set", "detect.batch_size=8",
                                  "--force"]}


def training_stages() -> set[str]:
    """Every recipe kind whose recipe has a `TrainConfig` block: the stages the loop trains."""
    return {kind for kind in RECIPES
            if TrainConfig in typing.get_type_hints(recipe_class(kind)).values()}


def _plan(world: Path, runs1: Path, out: Path, world_size: int) -> list[dict]:
    plan = []
    for name, (args, batch, _) in STAGES.items():
        per_rank = GLOBAL // world_size if batch == "rank" else GLOBAL
        plan.append({"name": name, "args": [name, *map(str, args(world, runs1)), "--out", str(out / name),
                                            *TRAIN, "--set", f"train.batch_size={per_rank}"]})
        if name == "pretrain" and world_size == 1:
            plan.append({"name": "regions", "args": [*map(str, SETUP["regions"](world, runs1)),
                                                     "--out", str(runs1 / "regions")]})
    return plan


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLA_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-rank runs (which also build every input), then the same stages as one 2-rank torchrun."""
    root = tmp_path_factory.mktemp("invariance")
    world, one, two = root / "world", root / "one", root / "two"
    plans = {}
    for n, out in ((1, one), (WORLD, two)):
        plans[n] = root / f"plan{n}.json"
        plans[n].write_text(json.dumps([{"name": "synth", "args": ["synth", "--out", str(world), *SYNTH]}] * (n == 1)
                                       + _plan(world, one, out, n)))
    _run([sys.executable, str(WORKER), str(plans[1]), str(root / "results1")])
    torchrun = Path(sys.executable).with_name("torchrun")
    _run([str(torchrun), "--standalone", "--nproc-per-node", str(WORLD), str(WORKER), str(plans[WORLD]),
          str(root / "results2")])
    return root


def _results(root: Path, n: int, stage: str) -> list[dict]:
    files = sorted((root / f"results{n}" / stage).glob("rank*.json"))
    assert len(files) == n, f"{stage} at {n} rank(s): {len(files)} result files"
    return [json.loads(f.read_text()) for f in files]


def _losses(art: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (art / "metrics.jsonl").read_text().splitlines()]


def _step_state(art: Path) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(first moments, last Adam updates, parameters after the steps) of the trained tensors, in
    optimizer order."""
    ck = torch.load(art / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    assert ck["step"] == STEPS
    opt = ck["optimizer"]
    grads, updates, ids = [], [], []
    for group in opt["param_groups"]:
        b1, b2 = group["betas"]
        for i in group["params"]:
            st = opt["state"].get(i)
            if st is None or "exp_avg" not in st:
                continue
            grads.append(st["exp_avg"])
            m_hat, v_hat = st["exp_avg"] / (1 - b1 ** STEPS), st["exp_avg_sq"] / (1 - b2 ** STEPS)
            updates.append(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))
            ids.append(i)
    return grads, updates, [ck["model"]]


def _norm(ts: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts))) if ts else 0.0


def test_every_training_stage_is_in_the_harness():
    """A kind with a `train:` block joins the registry only with an entry here."""
    assert training_stages() == set(STAGES), (
        f"add {sorted(training_stages() - set(STAGES))} to STAGES in tests/test_invariance.py")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [pytest.param(s, marks=m) if m else s for s, (_, _, m) in STAGES.items()])
def test_two_ranks_train_as_one_process(runs, stage):
    """1 process on the global batch and 2 gloo ranks on half each: the same losses, gradients
    and parameter updates over the first steps (to the module docstring's fp32 tolerances)."""
    for n in (1, WORLD):
        for r in _results(runs, n, stage):
            assert r["exit_code"] == 0, f"{stage} at {n} rank(s):\n{r['output']}"
    one, two = runs / "one" / stage, runs / "two" / stage
    l1, l2 = _losses(one), _losses(two)
    g1, u1, (p1,) = _step_state(one)
    g2, _, (p2,) = _step_state(two)
    assert len(g1) == len(g2) and g1, stage
    grad_err = _norm([a - b for a, b in zip(g1, g2)]) / _norm(g1)
    update = _norm(u1)
    param_err = _norm([p1[k].double() - p2[k].double() for k in p1 if p1[k].is_floating_point()])
    report = f"{stage}: losses {l1} vs {l2}; gradient rel. error {grad_err:.2e}; " \
             f"parameters {param_err:.2e} vs update {update:.2e}"
    (runs / f"report-{stage}.txt").write_text(report + "\n")
    print(report)
    assert len(l1) == len(l2) == STEPS, report
    assert all(abs(a - b) <= TOL[0] * max(1.0, abs(a)) for a, b in zip(l1, l2)), report
    assert grad_err <= TOL[1], report
    assert update > 0 and param_err <= TOL[2] * update, report
