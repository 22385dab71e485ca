"""A stage killed mid-training (SIGKILL, as a crash or a preempted job) leaves nothing that looks
finished, and rerunning the same command resumes to exactly the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.test_cli import SMALL_WORLD, vla

TRAIN = ["--model", "vla-micro-clip", "--set", "train.steps=24", "--set", "train.batch_size=8",
         "--set", "train.checkpoint_every=2", "--set", "train.warmup_steps=2", "--set", "eval.sets=[]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "world"
    r = vla("synth", "--out", out, *SMALL_WORLD)
    assert r.returncode == 0, r.stderr
    return out


def test_killed_pretrain_resumes_to_identical_weights(world, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = vla("pretrain", "--data", world, "--out", whole, *TRAIN)
    assert r.returncode == 0, r.stderr

    ckpt = tmp_path / ".killed.partial" / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "vla", "pretrain", "--data", str(world), "--out", str(killed),
                             *TRAIN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "VLA_NO_PROGRESS": "1"})
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    assert not killed.exists()  # nothing that looks like an artifact

    r = vla("pretrain", "--data", world, "--out", killed, *TRAIN)
    assert r.returncode == 0, r.stderr
    m = json.loads((killed / "manifest.json").read_text())
    assert m["resumed"] is True
    a = load_file(whole / "model" / "open_clip_model.safetensors")
    b = load_file(killed / "model" / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k
