"""Two gloo ranks on half a batch each == one process on the whole batch."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _records(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_match_one_process_with_the_doubled_batch(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLA_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(WORKER), str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    worker = _worker_module()
    worker.main(tmp_path / "single")

    ddp, single = _records(tmp_path / "ddp"), _records(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 7))
    for a, b in zip(ddp, single):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert a["samples"] == b["samples"]  # both count the global batch
    assert single[-1]["samples"] == 6 * 2 * worker.GLOBAL_BATCH

    ck_ddp = torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=True)
    ck_single = torch.load(tmp_path / "single/checkpoints/last.pt", weights_only=True)
    assert len(ck_ddp["rng"]) == 2  # each rank's RNG state, for an exact resume
    assert ck_ddp["step"] == ck_single["step"] == 6
    for name, w in ck_single["model"].items():
        assert torch.allclose(ck_ddp["model"][name], w, atol=1e-6), name
    # Training moved the weights: equality above is not the trivial kind.
    assert not torch.allclose(ck_single["model"]["0.weight"], worker.make_model()[0].weight)


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step(tmp_path):
    """Slurm preemption under torchrun: torchrun passes SIGTERM to its workers; the stop request
    travels in the step's all-reduce, so both ranks stop after the same step and save one checkpoint
    together (both ranks' RNG states in it), and every rank says where a rerun resumes (each in
    its own file)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLA_NO_PROGRESS": "1"}
    workdir = tmp_path / "ddp"
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc-per-node", "2", str(WORKER), str(workdir),
                             "preemptible"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    ckpt = torch.load(workdir / "checkpoints/last.pt", weights_only=True)
    last = _records(workdir)[-1]["step"]
    assert ckpt["step"] == last and len(ckpt["rng"]) == 2, err[-3000:]
    want = f"stopped by SIGTERM at step {last} of 100000; checkpoint saved: rerun the same command to resume " \
           f"from step {last}"
    assert [(workdir / f"stopped-rank{r}.txt").read_text() for r in range(2)] == [want, want], err[-3000:]
