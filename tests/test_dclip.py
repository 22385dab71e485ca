"""DCLIP's stages through the CLI on a tiny world: train-detector, precompute-regions,
train-teacher, train-student."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_cli import SMALL_WORLD, vla


@pytest.fixture(scope="module")
def yolo_env(tmp_path_factory):
    return {"YOLO_CONFIG_DIR": str(tmp_path_factory.mktemp("yolo-config"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("dclip") / "world"
    r = vla("synth", "--out", out, *SMALL_WORLD)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def detector(world, yolo_env):
    out = world.parent / "detector"
    r = vla("train-detector", "--data", world, "--out", out, "--epochs", "2", "--set", "batch=16", env=yolo_env)
    assert r.returncode == 0, r.stderr + r.stdout
    return out


# --- train-detector --------------------------------------------------------------------------------


def test_train_detector_writes_pickle_free_weights_and_ultralytics_metrics(detector, yolo_env, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from vla.artifacts import sha256_file
    from vla.errors import UserError
    from vla.models.region_detector import resolve_detector

    m = json.loads((detector / "manifest.json").read_text())
    assert m["kind"] == "train-detector" and m["inputs"]["data"]["kind"] == "synth"
    for key in ("mAP50", "mAP50-95"):
        assert 0.0 <= m["metrics"]["val"][key] <= 1.0
    assert not [p for p in detector.rglob("*") if p.suffix in (".pt", ".pth", ".pkl")]  # no pickles kept
    assert m["detector"]["classes"]["0"] == "circle"

    monkeypatch.setenv("YOLO_CONFIG_DIR", yolo_env["YOLO_CONFIG_DIR"])
    ours = resolve_detector(str(detector))
    assert ours.reference["kind"] == "train-detector" and ours.reference["digest"] == m["digest"]
    saved = load_file(detector / "detector" / "weights.safetensors")
    loaded = ours.model.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)

    # a user's .pt is loaded as ultralytics loads it, and its sha256 recorded
    user_pt = tmp_path / "user.pt"
    ours.model.save(str(user_pt))
    theirs = resolve_detector(str(user_pt))
    assert theirs.reference["sha256"] == sha256_file(user_pt)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a = ours.model.model.eval()(x)[0]
        b = theirs.model.model.float().eval()(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # ultralytics saves in fp16
    with pytest.raises(UserError, match="not on disk"):
        resolve_detector(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="'synth' artifact"):
        resolve_detector(str(detector.parent / "world"))
