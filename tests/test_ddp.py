"""Two gloo ranks on half a batch each == one process on the whole batch."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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
