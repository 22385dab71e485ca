"""`make gpu-check`'s script, tested where there is no GPU: its own logic at tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vla.gpucheck import peak_flops

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def test_gpu_check_self_test_runs_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "vla.gpucheck", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert proc.returncode == 0, json.dumps(report, indent=1)[-4000:]
    assert list(checks) == ["cuda-tests", "curriculum", "torchrun", "compile", "throughput"]
    assert all(c["ok"] for c in checks.values())
    assert "| throughput | ok |" in proc.stdout and "5/5 checks passed" in proc.stdout
    assert "2 ranks (gloo)" in checks["torchrun"]["summary"]
    assert checks["throughput"]["details"]["samples_per_s"] > 0
    assert checks["throughput"]["details"]["flops_per_sample"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "vla.gpucheck"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "no CUDA GPU is visible" in proc.stdout


def test_mfu_peaks_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some Future GPU") is None
