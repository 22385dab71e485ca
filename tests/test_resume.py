"""A stage killed mid-training (SIGKILL, as a crash) or stopped by SIGTERM (a preempted job) leaves
nothing that looks finished, and rerunning the same command resumes to exactly the weights of an
uninterrupted run."""

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


@pytest.fixture(scope="module")
def whole(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "whole"
    r = vla("pretrain", "--data", world, "--out", out, *TRAIN)
    assert r.returncode == 0, r.stderr
    return out


def assert_same_weights(a_dir, b_dir):
    a = load_file(a_dir / "model" / "open_clip_model.safetensors")
    b = load_file(b_dir / "model" / "open_clip_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_killed_pretrain_resumes_to_identical_weights(world, whole, tmp_path):
    killed = tmp_path / "killed"

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
    r = vla("inspect", killed)
    assert r.returncode == 2
    assert f"{killed} is unfinished (its run was killed before it finished); rerun the same command to " \
           f"resume from step " in r.stderr

    r = vla("pretrain", "--data", world, "--out", killed, *TRAIN)
    assert r.returncode == 0, r.stderr
    assert "resuming from step " in r.stderr
    m = json.loads((killed / "manifest.json").read_text())
    assert m["resumed"] is True
    assert_same_weights(whole, killed)


def test_sigterm_saves_a_checkpoint_at_that_step_and_the_rerun_resumes_exactly(world, whole, tmp_path):
    """A scheduler's SIGTERM (Slurm preemption) before the first periodic checkpoint: the run saves
    one at the step it stopped at, says so, and the rerun continues from there to identical weights.
    `log_every` and `checkpoint_every` change no result, so the rerun may use the defaults."""
    out = tmp_path / "preempted"
    often = ["--set", "train.log_every=1", "--set", "train.checkpoint_every=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "vla", "pretrain", "--data", str(world), "--out", str(out),
                             *TRAIN, *often], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "VLA_NO_PROGRESS": "1"})
    metrics = tmp_path / ".preempted.partial" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # early: leave the run time to stop
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    step = json.loads((tmp_path / ".preempted.partial" / "checkpoints" / "last.json").read_text())["step"]
    assert 1 <= step < 24
    assert f"stopped by SIGTERM at step {step} of 24; checkpoint saved: rerun the same command to resume " \
           f"from step {step}" in err

    r = vla("pretrain", "--data", world, "--out", out, *TRAIN)
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {step} of 24" in r.stderr
    assert_same_weights(whole, out)
