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


@pytest.mark.slow
def test_gpu_check_self_test_runs_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, "-m", "vla.gpucheck", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert proc.returncode == 0, json.dumps(report, indent=1)[-4000:]
    assert list(checks) == ["cuda-tests", "curriculum", "dclip", "mmgem", "torchrun", "invariance", "compile",
                            "throughput", "recipes"]
    assert all(c["ok"] for c in checks.values())
    assert "| recipes | ok |" in proc.stdout and "9/9 checks passed" in proc.stdout
    rows = checks["recipes"]["details"]["rows"]
    assert len(rows) == 8 and all(r["samples_per_s"] > 0 for r in rows)
    assert "2 ranks (gloo) = 1 process" in checks["invariance"]["summary"]
    assert "2 ranks (gloo)" in checks["torchrun"]["summary"]
    assert checks["throughput"]["details"]["samples_per_s"] > 0
    assert checks["throughput"]["details"]["flops_per_sample"] > 0


def _fake_nvidia_smi(bin_dir: Path, driver: str) -> dict:
    """An environment whose PATH starts with an `nvidia-smi` that reports `driver`: a GPU machine
    as this torch sees it when its CUDA build is newer than the driver (CUDA unavailable)."""
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{driver}'\n")
    smi.chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_a_gpu_fails_saying_nothing_was_checked():
    proc = subprocess.run([sys.executable, "-m", "vla.gpucheck"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "nothing was checked" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU that torch cannot use")
def test_gpu_check_fails_in_one_line_where_the_driver_is_too_old_for_torchs_cuda(tmp_path):
    """A GPU is present (nvidia-smi answers) but CUDA is unavailable: gpu-check fails with one line
    naming torch's CUDA build, the driver and the fix, instead of "nothing to check"."""
    env = _fake_nvidia_smi(tmp_path / "bin", "535.104.05")
    proc = subprocess.run([sys.executable, "-m", "vla.gpucheck"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stdout + proc.stderr
    assert f"built for CUDA {torch.version.cuda}" in lines[0] and "driver 535.104.05" in lines[0]
    assert "--index-url https://download.pytorch.org/whl/cu" in lines[0]
    if torch.version.cuda and int(torch.version.cuda.split(".")[0]) >= 13:
        assert "needs driver >= 580" in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a GPU that torch cannot use")
def test_a_stage_refuses_device_auto_on_the_cpu_where_a_gpu_is_present(tmp_path):
    """`device: auto` resolving to the CPU on a GPU machine is an error (exit 2, one line naming the
    driver and torch's CUDA build); `train.device=cpu` trains on the CPU on purpose."""
    world = tmp_path / "world"
    subprocess.run([sys.executable, "-m", "vla", "synth", "--out", str(world), "--recipe", "recipes/smoke/synth.yaml",
                    "--set", "n_train=8", "--set", "n_val=0", "--set", "n_test=8", "--set", "yolo_train=0"],
                   cwd=ROOT, env=ENV, capture_output=True, check=True, timeout=120)
    env = _fake_nvidia_smi(tmp_path / "bin", "535.104.05")
    args = [sys.executable, "-m", "vla", "pretrain", "--data", str(world), "--recipe", "recipes/smoke/pretrain.yaml",
            "--set", "train.steps=1", "--set", "train.batch_size=4", "--set", "eval.sets=[]"]
    proc = subprocess.run([*args, "--out", str(tmp_path / "auto")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "device 'auto' would train on the CPU" in line[0] and "535.104.05" in line[0], line
    assert not (tmp_path / "auto").exists()
    proc = subprocess.run([*args, "--out", str(tmp_path / "cpu"), "--set", "train.device=cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cpu" / "manifest.json").read_text())["device"] == "cpu"


def test_torchrun_refuses_device_auto_without_a_gpu_unless_asked():
    """Under torchrun (WORLD_SIZE > 1) `auto` finding no GPU is an error naming the fix; `cpu`, or
    VLA_ALLOW_CPU=1, is the CPU on purpose."""
    from vla.distributed import resolve_device
    from vla.errors import UserError

    if torch.cuda.is_available():
        assert resolve_device("auto", 0, 2).type == "cuda"
        return
    with pytest.raises(UserError, match="torchrun started 8 ranks but no GPU is visible.*train.device=cpu"):
        resolve_device("auto", 0, 8)
    assert resolve_device("cpu", 0, 8).type == "cpu"
    os.environ["VLA_ALLOW_CPU"] = "1"
    try:
        assert resolve_device("auto", 0, 8).type == "cpu"
    finally:
        del os.environ["VLA_ALLOW_CPU"]


def test_mfu_peaks_by_device_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("Some Future GPU") is None


def test_a_dev_shm_too_small_for_the_workers_batches_stops_naming_the_fix(monkeypatch):
    """Batches in flight (workers × 2 × local ranks) larger than /dev/shm: a one-line error saying
    how much is needed and what to change; a /dev/shm that holds them passes."""
    import shutil
    from collections import namedtuple

    from vla.errors import UserError
    from vla.stages.common import check_shared_memory

    usage = namedtuple("usage", "total used free")
    batch = {"image": torch.zeros(512, 3, 224, 224), "key": ["k"] * 512}  # 294 MiB in fp32
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(64 * 2**20, 0, 64 * 2**20))  # docker's default
    with pytest.raises(UserError, match=r"/dev/shm holds 0\.06 GiB, but 8 data workers × 2 batches in flight × 8 "
                                        r"rank\(s\) of 294 MiB need about 36\.75 GiB; give the container more "
                                        r"\(docker run --shm-size=56g"):
        check_shared_memory(batch, 8)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(64 * 2**30, 0, 64 * 2**30))
    check_shared_memory(batch, 8)  # 64 GiB holds them
