"""DCLIP's train-teacher and train-student mean the same run on 2 gloo ranks as on one: the same
first-step loss on the same global batch (the InfoNCE gathers its negatives across ranks), the
same per-epoch teachers under the same labels with gradient accumulation, and the per-epoch
evaluation rows labelled with the right epochs and steps. Every check reads files the runs
wrote (metrics.jsonl, manifests, weights), never a shared stdout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_cli import VLA, vla

N_TRAIN = 32  # one shard (shard_size 100): each of 2 ranks streams every other record
WORLD = ["--set", f"n_train={N_TRAIN}", "--set", "n_val=12", "--set", "n_test=40", "--set", "shard_size=100",
         "--set", "workers=1"]


def _run(args: list, ranks: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLA_NO_PROGRESS": "1"}
    if ranks == 1:
        cmd = [*VLA, *map(str, args)]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(ranks), "-m", "vla", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _metrics(art: Path) -> list[dict]:
    return [json.loads(line) for line in (art / "metrics.jsonl").read_text().splitlines()]


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    """A tiny world, a micro CLIP saved to disk (the same weights in every process) and its oracle
    regions."""
    from vla.models.clip import load_clip, save_clip

    d = tmp_path_factory.mktemp("dclip-ranks")
    r = vla("synth", "--out", d / "world", *WORLD)
    assert r.returncode == 0, r.stderr
    torch.manual_seed(0)
    save_clip(load_clip("vla-micro-clip"), d / "clip")
    r = vla("precompute-regions", "--data", d / "world", "--out", d / "regions", "--detector", "oracle",
            "--clip", f"local-dir:{d / 'clip'}", "--set", "detect.imgsz=64")
    assert r.returncode == 0, r.stderr
    return d


TEACHER = ["--recipe", "recipes/smoke/dclip/train-teacher.yaml", "--epochs", "2", "--set", "train.batch_size=8",
           "--set", "train.grad_accum=2", "--set", "train.log_every=1", "--set", "train.device=cpu"]


@pytest.fixture(scope="module")
def teachers(regions):
    d = regions
    for ranks in (1, 2):
        _run(["train-teacher", "--regions", d / "regions", "--out", d / f"teacher-{ranks}", *TEACHER], ranks)
    return d / "teacher-1", d / "teacher-2"


def test_teacher_on_two_ranks_is_the_one_rank_run(teachers):
    """Global batch 8 (4 rows a rank), 2 micro-batches a step: an epoch of 32 images is 2 optimizer
    steps on any rank count; step 1's loss and both saved epochs' weights agree with one rank."""
    from safetensors.torch import load_file

    one, two = teachers
    m1, m2 = _manifest(one), _manifest(two)
    assert m1["counts"]["steps_per_epoch"] == m2["counts"]["steps_per_epoch"] == N_TRAIN // 8 // 2
    assert m1["counts"]["steps"] == m2["counts"]["steps"] == 4 and m1["epochs"] == m2["epochs"] == [1, 2]
    a, b = _metrics(one), _metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], abs=1e-5)
    assert a[0]["samples"] == b[0]["samples"] == 16  # the global batch × grad_accum, counted once
    for epoch in (1, 2):
        name = f"teacher/teacher-epoch{epoch:03d}.safetensors"
        w1, w2 = load_file(one / name), load_file(two / name)
        assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1), name
    first, last = load_file(one / "teacher/teacher-epoch001.safetensors"), load_file(one / "teacher/teacher-epoch002.safetensors")
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the epochs are different teachers


def test_teacher_image_negatives_on_two_ranks_is_the_one_rank_loss(regions, tmp_path):
    """With `image_negatives`, caption j is scored against the images at global batch positions
    j, j+1, .., j+M: the same pairs whichever rank holds row j, so step 1's InfoNCE, L_img and
    their sum agree with one rank's, and L_img starts near ln(1 + M) (an untrained teacher)."""
    runs = []
    for ranks in (1, 2):
        out = tmp_path / f"teacher-neg-{ranks}"
        _run(["train-teacher", "--regions", regions / "regions", "--out", out, *TEACHER,
              "--set", "image_negatives=3"], ranks)
        runs.append(_metrics(out)[0])
    one, two = runs
    for key in ("loss", "infonce", "image"):
        assert one[key] == pytest.approx(two[key], abs=1e-5), key
    assert one["loss"] == pytest.approx(one["infonce"] + one["image"], abs=1e-5)
    assert 0.5 * math.log(4) < one["image"] < 2 * math.log(4)


def test_teacher_image_negatives_must_fit_the_global_batch(regions, tmp_path):
    r = vla("train-teacher", "--regions", regions / "regions", "--out", tmp_path / "t", *TEACHER,
            "--set", "image_negatives=8")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "image_negatives must be 0 or more and below train.batch_size 8" in r.stderr
    assert not (tmp_path / "t" / "manifest.json").exists()


STUDENT = ["--recipe", "recipes/smoke/dclip/train-student.yaml", "--set", f"train.batch_size={N_TRAIN}",
           "--set", "train.log_every=1", "--set", "train.device=cpu", "--set", "eval.sets=[]",
           "--set", "data.train_preprocess=open_clip", "--set", "data.num_workers=0"]


def test_student_first_step_on_two_ranks_is_the_one_rank_loss(teachers, tmp_path):
    """The global batch is the whole (one-step) epoch, 16 images a rank: step 1's loss and its
    terms (distillation, InfoNCE over all 32) equal the one-rank run's."""
    one = teachers[0]
    for ranks in (1, 2):
        _run(["train-student", "--teacher", one, "--out", tmp_path / f"s{ranks}", *STUDENT,
              "--set", "train.steps=1"], ranks)
    a, b = _metrics(tmp_path / "s1")[0], _metrics(tmp_path / "s2")[0]
    for k in ("loss", "distill", "contrastive"):
        assert a[k] == pytest.approx(b[k], abs=1e-5), k
    assert a["samples"] == b["samples"] == N_TRAIN


def test_student_epoch_eval_labels_on_two_ranks(teachers, tmp_path):
    """epochs: 2 of 32 images at global batch 8 → 4 steps an epoch on 2 ranks; the val rows are
    epochs 0, 1, 2 at steps 0, 4, 8 (scored after training, from each epoch's saved tower)."""
    out = tmp_path / "s"
    _run(["train-student", "--teacher", teachers[0], "--out", out, *STUDENT, "--set", "train.batch_size=8",
          "--set", "epochs=2", "--set", "epoch_eval=true", "--set", "epoch_eval_images=8"], 2)
    m = _manifest(out)
    assert m["counts"]["train"]["steps"] == 8
    assert [(r["epoch"], r["step"]) for r in m["epoch_eval"]] == [(0, 0), (1, 4), (2, 8)]
    assert not (out / "epoch-snapshots").exists()


def test_precompute_regions_splits_its_shards_over_two_ranks(regions, tmp_path):
    """Under torchrun each rank encodes its own shards (s % 2 == rank); the table is the one-rank
    table, shard for shard."""
    import numpy as np

    d = regions
    args = ["precompute-regions", "--data", d / "world", "--detector", "oracle", "--clip", f"local-dir:{d / 'clip'}",
            "--set", "detect.imgsz=64", "--set", "shard_size=10", "--set", "device=cpu"]
    _run([*args, "--out", tmp_path / "r1"], 1)
    _run([*args, "--out", tmp_path / "r2"], 2)
    m1, m2 = _manifest(tmp_path / "r1"), _manifest(tmp_path / "r2")
    assert m2["counts"]["ranks"] == 2 and m1["counts"]["images"] == m2["counts"]["images"] == N_TRAIN
    shards = sorted(p.name for p in (tmp_path / "r1" / "regions").glob("shard-*"))
    assert len(shards) == 4 and shards == sorted(p.name for p in (tmp_path / "r2" / "regions").glob("shard-*"))
    for shard in shards:
        for name in ("emb", "global", "boxes", "offsets", "conf", "area"):
            a = np.load(tmp_path / "r1" / "regions" / shard / f"{name}.npy")
            b = np.load(tmp_path / "r2" / "regions" / shard / f"{name}.npy")
            assert np.allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-3), (shard, name)
