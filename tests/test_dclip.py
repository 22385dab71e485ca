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


@pytest.fixture(scope="module")
def base_clip(world):
    out = world.parent / "clip"
    r = vla("pretrain", "--data", world, "--out", out, "--model", "vla-micro-clip", "--set", "train.steps=4",
            "--set", "train.batch_size=16", "--set", "eval.sets=[]")
    assert r.returncode == 0, r.stderr
    return out


REGION_SETTINGS = ["--set", "detect.imgsz=64", "--set", "shard_size=25", "--set", "detect.batch_size=8"]


@pytest.fixture(scope="module")
def oracle_regions(world, base_clip):
    out = world.parent / "regions-oracle"
    r = vla("precompute-regions", "--data", world, "--out", out, "--detector", "oracle", "--clip", base_clip,
            *REGION_SETTINGS)
    assert r.returncode == 0, r.stderr
    return out


# --- precompute-regions ----------------------------------------------------------------------------


def test_crops_are_normalised_as_the_clips_preprocessing_does():
    from PIL import Image

    from vla.models.clip import load_clip
    from vla.stages.precompute_regions import clip_pixels

    clip = load_clip("vla-micro-clip")
    cfg = clip.model.visual.preprocess_cfg
    crop = Image.new("RGB", (13, 7), (255, 128, 0))  # a non-square crop of any size
    pixels = clip_pixels(clip, [crop])
    assert pixels.shape == (1, 3, 32, 32)
    want = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    torch.testing.assert_close(pixels[0].mean((1, 2)), want.float(), rtol=0, atol=1e-5)
    assert pixels.min() < 0  # normalised, not the [0, 1] tensor the public code feeds


def test_oracle_regions_are_the_worlds_boxes_encoded_by_the_frozen_clip(world, base_clip, oracle_regions):
    from vla.data.regions import RegionStore
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.models.clip import load_clip
    from vla.stages.precompute_regions import clip_pixels

    m = json.loads((oracle_regions / "manifest.json").read_text())
    assert m["kind"] == "precompute-regions" and m["counts"]["images"] == 60 and m["counts"]["no_detection"] == 0
    assert m["inputs"]["clip"]["kind"] == "pretrain" and m["inputs"]["detector"]["kind"] == "oracle"
    store = RegionStore.open(oracle_regions / "regions")
    assert len(store) == 60 and len(store.meta["shards"]) == 3
    assert isinstance(store.shards[0].arrays["emb"], __import__("numpy").memmap)  # read lazily

    clip = load_clip("local-dir:" + str(base_clip / "model"))
    sample = next(resolve_data(world / "train").iter_samples(SkipCounter()))
    im = store.image(sample.key)
    assert im["boxes"].tolist() == [list(r.box) for r in sample.regions]
    assert (im["conf"] == 1).all() and (im["cls"] == -1).all()
    w, h = sample.image.size
    areas = [(x1 - x0) * (y1 - y0) / (w * h) for x0, y0, x1, y1 in im["boxes"].tolist()]
    assert im["area"].tolist() == pytest.approx(areas)
    crops = [sample.image.crop(tuple(int(v) for v in b)) for b in im["boxes"].tolist()]
    with torch.no_grad():
        want = clip.model.eval().encode_image(clip_pixels(clip, crops), normalize=True)
        want_global = clip.model.encode_image(clip_pixels(clip, [sample.image]), normalize=True)[0]
    torch.testing.assert_close(torch.from_numpy(im["emb"].astype("float32")), want, rtol=0, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(im["global"].astype("float32")), want_global, rtol=0, atol=2e-3)

    batch = store.lookup([sample.key, sample.key], top_k=2)
    assert batch["regions"].shape == (2, 3, 32) and batch["mask"][0].tolist() == [True, True, len(crops) > 1]
    assert batch["conf"][0, 0] == 1 and batch["area"][0, 0] == 1  # the global embedding comes first


def test_bad_boxes_are_dropped_and_counted():
    from vla.data.regions import clean_boxes, clip_box

    nan = float("nan")
    boxes = [(1, 1, 10, 10), (nan, 0, 5, 5), (70, 70, 90, 90), (-5, -5, -1, 3), (5, 5, 5.5, 9), (-4, 50, 20, 80)]
    kept, dropped = clean_boxes(boxes, 64, 64)
    assert kept == [0, 5] and dropped == {"nan": 1, "outside": 2, "empty": 1}
    assert clip_box(boxes[5], 64, 64) == (0, 50, 20, 64)  # partly outside: clipped


def test_no_detection_gets_the_whole_image_and_is_counted(world, base_clip, detector, yolo_env):
    out = world.parent / "regions-yolo"
    # a 2-epoch YOLO finds nothing at ultralytics' default confidence
    r = vla("precompute-regions", "--data", world, "--out", out, "--detector", detector, "--clip", base_clip,
            *REGION_SETTINGS, "--set", "detect.conf=0.9", env=yolo_env)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["no_detection"] == m["counts"]["images"] == m["counts"]["regions"] == 60
    assert m["inputs"]["detector"]["digest"] == json.loads((detector / "manifest.json").read_text())["digest"]
    from vla.data.regions import RegionStore

    store = RegionStore.open(out / "regions")
    im = store.image(store.keys()[0])
    assert im["boxes"].tolist() == [[0, 0, 64, 64]] and im["area"].tolist() == [1.0]


class _Crash(Exception):
    pass


def test_interrupted_precompute_resumes_after_its_last_shard(world, base_clip, oracle_regions, tmp_path, monkeypatch):
    import numpy as np

    from vla.recipes import load_recipe
    from vla.stages import precompute_regions as stage

    cfg = load_recipe(stage.PrecomputeRegionsRecipe, None, ["detector=oracle", f"clip={base_clip}",
                                                            "detect.imgsz=64", "shard_size=25", "detect.batch_size=8"])
    real, calls, crash = stage.regions_of_batch, [], [True]

    def crash_in_shard_two(*args, **kw):
        calls.append(1)
        if crash[0] and len(calls) == 5:  # batches of 8: shard 0 takes 4 calls, the 5th is in shard 1
            raise _Crash
        return real(*args, **kw)

    monkeypatch.setattr(stage, "regions_of_batch", crash_in_shard_two)
    with pytest.raises(_Crash):
        stage.run(cfg, world, tmp_path / "r")
    partial = tmp_path / ".r.partial" / "regions"
    assert [p.name for p in sorted(partial.glob("shard-*"))] == ["shard-00000"]
    calls.clear()
    crash[0] = False
    art = stage.run(cfg, world, tmp_path / "r")
    assert art.manifest["resumed"] is True and len(calls) == 6  # shards 1 and 2 only
    for shard in ("shard-00000", "shard-00001", "shard-00002"):
        for name in ("emb", "boxes", "offsets", "global"):
            a = np.load(tmp_path / "r" / "regions" / shard / f"{name}.npy")
            b = np.load(oracle_regions / "regions" / shard / f"{name}.npy")
            assert np.array_equal(a, b), (shard, name)
    assert art.manifest["counts"]["images"] == 60


def test_missing_detector_or_clip_is_refused_before_compute(world, base_clip, tmp_path):
    r = vla("precompute-regions", "--data", world, "--out", tmp_path / "a", "--detector", tmp_path / "yolov8x.pt",
            "--clip", base_clip)
    assert r.returncode == 2 and "not on disk" in r.stderr and str(tmp_path / "yolov8x.pt") in r.stderr
    r = vla("precompute-regions", "--data", world, "--out", tmp_path / "b", "--detector", "oracle",
            "--clip", "clip-vit-l")
    assert r.returncode == 2 and "not available offline" in r.stderr
    r = vla("precompute-regions", "--data", world, "--out", tmp_path / "c", "--detector", "oracle", "--clip", world)
    assert r.returncode == 2 and "'synth' artifact" in r.stderr
    assert not any((tmp_path / n).exists() or (tmp_path / f".{n}.partial").exists() for n in "abc")
