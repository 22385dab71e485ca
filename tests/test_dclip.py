"""DCLIP's stages through the CLI on a tiny world: train-detector, precompute-regions,
train-teacher, train-student, and `make dclip` with the smoke recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vla.cli import app

from tests.test_cli import SMALL_WORLD, VLA, vla

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def cli(*args):
    """The CLI in-process (where no process boundary matters: refusals, messages)."""
    return runner.invoke(app, [str(a) for a in args])


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
    out = world.parent / "dclip" / "detector"  # where `make dclip DCLIP_RUNS=…/dclip` looks for it
    r = vla("train-detector", "--data", world, "--out", out, "--recipe", "recipes/smoke/dclip/train-detector.yaml", env=yolo_env)
    assert r.returncode == 0, r.stderr + r.stdout
    return out


# --- train-detector --------------------------------------------------------------------------------


def test_train_detector_writes_pickle_free_weights_and_ultralytics_metrics(world, detector, yolo_env, monkeypatch,
                                                                          tmp_path):
    from safetensors.torch import load_file

    from vla.artifacts import sha256_file
    from vla.errors import UserError
    from vla.models.dclip.detector import resolve_detector

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
        resolve_detector(str(world))


@pytest.fixture(scope="module")
def base_clip(world):
    out = world.parent / "runs" / "clip"  # the base CLIP `make proclip RUNS=…/runs` shares with DCLIP
    r = vla("pretrain", "--data", world, "--out", out, "--recipe", "recipes/smoke/pretrain.yaml", "--set", "eval.sets=[]")
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


def test_crops_are_squashed_to_the_clip_input_by_default():
    """A crop is resized to the CLIP's square input whatever its aspect (the public code's resize):
    a wide crop keeps its left and right ends; the centre-crop reading cuts them off."""
    from PIL import Image

    from vla.models.clip import load_clip
    from vla.stages.precompute_regions import PrecomputeRegionsRecipe, clip_pixels

    assert PrecomputeRegionsRecipe().crop_resize == "squash" and PrecomputeRegionsRecipe().top_k is None
    clip = load_clip("vla-micro-clip")
    crop = Image.new("RGB", (96, 24), (0, 0, 255))
    crop.paste((255, 0, 0), (0, 0, 12, 24))  # a red left end, 1/8 of the width
    squashed, centred = clip_pixels(clip, [crop], squash=True), clip_pixels(clip, [crop])
    assert squashed.shape == centred.shape == (1, 3, 32, 32)
    assert squashed[0, 0, :, :2].mean() > squashed[0, 0, :, -2:].mean() + 1  # red survives on the left
    assert torch.allclose(centred[0, 0, :, :2], centred[0, 0, :, -2:])  # the centre crop lost it


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
        want = clip.model.eval().encode_image(clip_pixels(clip, crops, squash=True), normalize=True)
        want_global = clip.model.encode_image(clip_pixels(clip, [sample.image]), normalize=True)[0]
    torch.testing.assert_close(torch.from_numpy(im["emb"].astype("float32")), want, rtol=0, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(im["global"].astype("float32")), want_global, rtol=0, atol=2e-3)

    batch = store.lookup([sample.key, sample.key], top_k=2)  # the crops alone: no whole-image region beside them
    n = min(2, len(crops))
    assert batch["regions"].shape == (2, n, 32) and batch["mask"].all()
    torch.testing.assert_close(batch["regions"][0], torch.from_numpy(im["emb"][:n].astype("float32")))
    alone = store.lookup([sample.key], top_k=0)  # the no-regions arm: the whole image, conf 1, area 1
    assert alone["regions"].shape == (1, 1, 32) and alone["conf"].item() == 1 and alone["area"].item() == 1


def test_bad_boxes_are_dropped_and_counted():
    from vla.data.regions import clean_boxes, clip_box

    nan = float("nan")
    boxes = [(1, 1, 10, 10), (nan, 0, 5, 5), (70, 70, 90, 90), (-5, -5, -1, 3), (5, 5, 5.5, 9), (-4, 50, 20, 80)]
    kept, dropped = clean_boxes(boxes, 64, 64)
    assert kept == [0, 5] and dropped == {"nan": 1, "outside": 2, "empty": 1}
    assert clip_box(boxes[5], 64, 64) == (0, 50, 20, 64)  # partly outside: clipped


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
    r = cli("precompute-regions", "--data", world, "--out", tmp_path / "a", "--detector", tmp_path / "yolov8x.pt",
            "--clip", base_clip)
    assert r.exit_code == 2 and "not on disk" in r.output and "yolov8x.pt" in r.output
    r = cli("precompute-regions", "--data", world, "--out", tmp_path / "b", "--detector", "oracle",
            "--clip", "clip-vit-l")
    assert r.exit_code == 2 and "not available offline" in r.output
    r = cli("precompute-regions", "--data", world, "--out", tmp_path / "c", "--detector", "oracle", "--clip", world)
    assert r.exit_code == 2 and "'synth' artifact" in r.output
    r = cli("precompute-regions", "--data", world, "--out", tmp_path / "c", "--detector", "oracle", "--clip", base_clip,
            "--set", "top_k=0")
    assert r.exit_code == 2 and "top_k has an invalid value: 0" in r.output
    assert not any((tmp_path / n).exists() or (tmp_path / f".{n}.partial").exists() for n in "abc")


# --- train-teacher, train-student: the smoke curriculum by manifest -------------------------------------


def _manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


@pytest.fixture(scope="module")
def chain(world, base_clip, detector, yolo_env):
    """`make dclip` with the smoke recipes, on the world, base CLIP and detector made above (as
    `make proclip` and an earlier `make dclip` would have left them): regions → teacher → student
    → eval → export, each stage reading the previous one's artifact; then `make dclip` again."""
    d = world.parent
    make_vars = [f"WORLD={world}", f"RUNS={d / 'runs'}", f"DCLIP_RUNS={d / 'dclip'}", f"DCLIP_EXPORT={d / 'export'}",
                 "RECIPES=recipes/smoke", "SYNTH_RECIPE=recipes/smoke/synth.yaml"]
    env = {**os.environ, **yolo_env, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1"}
    runs = []
    for _ in range(2):
        r = subprocess.run(["make", "dclip", *make_vars], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs.append(r)
    return d / "dclip", runs


def test_make_dclip_reuses_the_shared_world_and_clip_and_a_second_run_does_nothing(chain):
    runs_dir, (first, second) = chain
    for shared in ("vla synth", "vla pretrain", "vla train-detector"):
        assert shared not in first.stdout  # built once, by the fixtures (as by make proclip)
    for stage in ("vla precompute-regions", "vla train-teacher", "vla train-student", "vla eval", "vla export"):
        assert stage in first.stdout and stage not in second.stdout
    table = (runs_dir / "eval" / "results.md").read_text()
    assert "DCLIP curriculum" in first.stdout and table.strip() in first.stdout


def test_smoke_dclip_chains_by_manifest(chain, world, base_clip, detector):
    chain = chain[0]
    regions, teacher, student = _manifest(chain / "regions"), _manifest(chain / "teacher"), _manifest(chain / "student")
    assert regions["inputs"]["detector"]["digest"] == _manifest(detector)["digest"]
    assert regions["inputs"]["clip"]["digest"] == _manifest(base_clip)["digest"]
    assert regions["inputs"]["data"]["digest"] == _manifest(world)["digest"]
    # a 2-epoch YOLO finds nothing at ultralytics' default confidence: each image is its own one region
    assert regions["counts"]["no_detection"] == regions["counts"]["images"] == regions["counts"]["regions"] == 60
    from vla.data.regions import RegionStore

    store = RegionStore.open(chain / "regions" / "regions")
    im = store.image(store.keys()[0])
    size = _manifest(world)["recipe"]["image_size"]  # the stored image, whole
    assert im["boxes"].tolist() == [[0, 0, size, size]] and im["area"].tolist() == [1.0]
    assert teacher["inputs"]["regions"]["digest"] == regions["digest"]
    assert teacher["inputs"]["clip"]["digest"] == _manifest(base_clip)["digest"]
    assert teacher["epochs"] == [1, 2] and teacher["counts"]["steps"] == 2 * (60 // 16)
    assert sorted(p.name for p in (chain / "teacher" / "teacher").glob("*.safetensors")) == [
        "teacher-epoch001.safetensors", "teacher-epoch002.safetensors"]
    assert student["inputs"]["teacher"]["digest"] == teacher["digest"] and student["recipe"]["teacher_epoch"] == 1
    assert set(student["metrics"]["train"]) >= {"loss", "distill", "contrastive"}
    assert "zeroshot" in student["metrics"]["eval"]  # a plain CLIP, scored with no boxes
    table = (chain / "eval" / "results.md").read_text()
    assert "clip" in table and "student" in table
    assert _manifest(chain.parent / "export")["inputs"]["model"]["digest"] == student["digest"]


def test_student_text_tower_is_bit_identical_and_image_tower_trained(chain, base_clip):
    chain = chain[0]
    from safetensors.torch import load_file

    before = load_file(base_clip / "model" / "open_clip_model.safetensors")
    after = load_file(chain / "student" / "model" / "open_clip_model.safetensors")
    assert before.keys() == after.keys()
    text_keys = [k for k in before if not k.startswith("visual.")]
    assert "token_embedding.weight" in text_keys and "text_projection" in text_keys
    for k in text_keys:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


def test_student_export_encodes_as_a_plain_clip_with_its_artifacts_embeddings(chain):
    """`vla.load` of the student's export is a plain CLIP whose image and text embeddings are the
    train-student artifact's own, bit for bit (the export copies the student, nothing retrained)."""
    import vla
    from PIL import Image

    from vla.models.load import load_encoder

    model = vla.load(chain[0].parent / "export")
    source = load_encoder(str(chain[0] / "student"))
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (48, 80), (20, 90, 200))]
    texts = ["a red circle", "two shapes on a blue background"]
    img, txt = model.encode_image(images), model.encode_text(texts)
    assert img.shape == txt.shape == (2, 32)
    assert torch.equal(img, source.encode_image(images))
    assert torch.equal(txt, source.encode_text(texts))


def test_preservation_loss_switch(chain, tmp_path):
    from vla.recipes import load_recipe
    from vla.stages import train_student

    cfg = load_recipe(train_student.TrainStudentRecipe, ROOT / "recipes/smoke/dclip/train-student.yaml",
                      [f"teacher={chain[0] / 'teacher'}", "preserve_weight=0.5", "train.steps=2", "eval.sets=[]"])
    m = train_student.run(cfg, None, tmp_path / "s").manifest
    assert m["recipe"]["preserve_weight"] == 0.5 and "preserve" in m["metrics"]["train"]
    # the target is the frozen CLIP's own image embedding (from the regions table): ≈ 0 at the start
    first = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= first["preserve"] < 0.05


TEACHER = ["--recipe", "recipes/smoke/dclip/train-teacher.yaml", "--epochs", "4", "--set", "train.batch_size=8",
           "--set", "train.checkpoint_every=1"]


def test_killed_train_teacher_resumes_to_identical_weights(oracle_regions, tmp_path):
    from safetensors.torch import load_file

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = vla("train-teacher", "--regions", oracle_regions, "--out", whole, *TEACHER)
    assert r.returncode == 0, r.stderr
    ckpt = tmp_path / ".killed.partial" / "checkpoints" / "last.pt"
    proc = subprocess.Popen([*VLA, "train-teacher", "--regions", str(oracle_regions), "--out", str(killed), *TEACHER],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "VLA_NO_PROGRESS": "1"})
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"

    r = vla("train-teacher", "--regions", oracle_regions, "--out", killed, *TEACHER)
    assert r.returncode == 0, r.stderr
    assert _manifest(killed)["resumed"] is True
    files = sorted(p.name for p in (whole / "teacher").glob("*.safetensors"))
    assert len(files) == 4 and files == sorted(p.name for p in (killed / "teacher").glob("*.safetensors"))
    for name in files:
        a, b = load_file(whole / "teacher" / name), load_file(killed / "teacher" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_wrong_inputs_are_refused_before_compute(oracle_regions, world, base_clip, tmp_path):
    r = cli("train-student", "--teacher", oracle_regions, "--out", tmp_path / "a")
    assert r.exit_code == 2 and "is a 'precompute-regions' artifact; --teacher expects 'train-teacher'" in r.output
    # the regions were built with the pretrained base CLIP, not a fresh micro CLIP
    r = cli("train-teacher", "--regions", oracle_regions, "--clip", "vla-micro-clip", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "was built with another CLIP" in r.output
    r = cli("train-teacher", "--regions", world, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "--regions expects 'precompute-regions'" in r.output
    assert not any((tmp_path / n).exists() or (tmp_path / f".{n}.partial").exists() for n in "abc")


# --- --out refused before any model is loaded -------------------------------------------------------


def test_bad_out_is_refused_before_any_model_loads(world, oracle_regions, tmp_path, monkeypatch):
    import vla.models.dclip as dclip
    import vla.offline as offline

    def no_model(*a, **kw):
        raise AssertionError("a model was loaded before --out was checked")

    monkeypatch.setattr(dclip, "load_dclip_clip", no_model)
    monkeypatch.setattr(offline, "import_ultralytics", no_model)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    cases = [
        ("train-detector", "--data", world, "--out", world / "yolo" / "det"),
        ("precompute-regions", "--data", world, "--detector", "oracle", "--clip", "vla-micro-clip", "--out", junk),
        ("train-teacher", "--regions", oracle_regions, "--out", oracle_regions / "teacher"),
        ("train-student", "--teacher", oracle_regions, "--out", junk, "--force"),
    ]
    for args in cases:
        r = cli(*args)
        assert r.exit_code == 2, (args[0], r.output)
        line = r.output.strip()
        assert "\n" not in line and "Traceback" not in r.output, r.output
        assert ("lies inside the data input" in line or "lies inside the regions input" in line
                or "is not a vla artifact" in line), (args[0], line)
    assert (junk / "notes.txt").read_text() == "mine" and sorted(p.name for p in junk.iterdir()) == ["notes.txt"]


# --- the ablation switches ----------------------------------------------------------------------------


def _student(chain, tmp_path, name, *sets):
    from vla.recipes import load_recipe
    from vla.stages import train_student

    cfg = load_recipe(train_student.TrainStudentRecipe, ROOT / "recipes/smoke/dclip/train-student.yaml",
                      [f"teacher={chain[0] / 'teacher'}", "train.steps=2", "eval.sets=[]", *sets])
    return train_student.run(cfg, None, tmp_path / name)


def test_no_teacher_student_is_infonce_only_and_builds_no_teacher_cache(chain, tmp_path, monkeypatch):
    import vla.models.dclip as dclip

    monkeypatch.setattr(dclip, "load_teacher", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("teacher used")))
    m = _student(chain, tmp_path, "s", "distill_weight=0").manifest
    assert m["recipe"]["distill_weight"] == 0
    assert "distill" not in m["metrics"]["train"] and m["metrics"]["train"]["loss"] == pytest.approx(
        m["metrics"]["train"]["contrastive"])


def test_average_fusion_teacher_trains_nothing_and_saves_every_epoch(oracle_regions, tmp_path):
    r = vla("train-teacher", "--regions", oracle_regions, "--out", tmp_path / "avg", *TEACHER[:4],
            "--set", "fusion=average", "--set", "train.batch_size=8")
    assert r.returncode == 0, r.stderr
    m = _manifest(tmp_path / "avg")
    assert m["trainable_parameters"] == 0 and m["counts"]["steps"] == 0 and m["epochs"] == [1, 2, 3, 4]
    assert m["metrics"]["train"]["loss"] > 0
    assert len(list((tmp_path / "avg" / "teacher").glob("teacher-epoch*.safetensors"))) == 4


def test_rope_and_cluster_student_trains_evaluates_and_is_refused_by_export(chain, tmp_path):
    from vla.models.dclip.vision_variants import RopeSelfAttention

    art = _student(chain, tmp_path, "rope", "rope_2d=true", "clusters=3")
    assert art.manifest["recipe"]["rope_2d"] is True and art.manifest["recipe"]["clusters"] == 3
    model = tmp_path / "rope" / "model"
    assert (model / "vla_vision.json").exists()
    # vla loads it with the tower changes; `vla eval` scores it with no boxes
    import vla

    loaded = vla.load(tmp_path / "rope")
    assert isinstance(loaded.model.visual.transformer.resblocks[0].attn, RopeSelfAttention)
    assert torch.count_nonzero(loaded.model.visual.positional_embedding) == 0
    r = cli("eval", tmp_path / "rope", "--data", chain[0].parent / "world", "--out", tmp_path / "ev",
            "--set", "sets=[retrieval]")
    assert r.exit_code == 0, r.output
    # open_clip's layout cannot represent RoPE or cluster pooling: export refuses, in one line
    r = cli("export", tmp_path / "rope", "--out", tmp_path / "exp")
    assert r.exit_code == 2 and "2-D RoPE and 3-cluster aggregation" in r.output and "open_clip" in r.output
    assert not (tmp_path / "exp").exists()


def test_epoch_eval_scores_the_val_split_after_every_epoch(chain, tmp_path):
    art = _student(chain, tmp_path, "ep", "epochs=2", "epoch_eval=true", "train.batch_size=30",
                   "epoch_eval_images=20")
    m = art.manifest
    assert m["counts"]["train"]["steps"] == 4  # 60 images, batches of 30: 2 steps an epoch
    rows = m["epoch_eval"]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["step"] for r in rows] == [0, 2, 4]
    for r in rows:
        assert 0 <= r["val_retrieval/image_retrieval_recall@1"] <= 1 and 0 <= r["val_zeroshot/acc1"] <= 1
    table = (tmp_path / "ep" / "epochs.md").read_text()
    assert "val text→image R@1" in table and "val zero-shot top-1" in table and len(table.splitlines()) == 5
    assert (tmp_path / "ep" / "epochs.png").stat().st_size > 1000
    r = cli("train-student", "--teacher", chain[0] / "teacher", "--out", tmp_path / "t",
            "--recipe", "recipes/smoke/dclip/train-student.yaml", "--set", "epoch_eval=true", "--set", "epoch_eval_split=test")
    assert r.exit_code == 2 and "other than test" in r.output


def test_embedded_arm_recipes_differ_from_their_base_only_where_named():
    """Same budget for every arm: an arm's recipe is its stage's recipe with only its switch changed."""
    import yaml

    def load(name):
        return yaml.safe_load((ROOT / "recipes" / "embedded" / "dclip" / f"{name}.yaml").read_text())

    arms = {"train-teacher-noregions": ("train-teacher", {"top_k": 0}),
            "train-teacher-average": ("train-teacher", {"fusion": "average"}),
            "train-teacher-converged": ("train-teacher", {"epochs": 12}),
            "train-student-noteacher": ("train-student", {"distill_weight": 0.0}),
            "train-student-converged": ("train-student", {"teacher_epoch": 12})}
    for arm, (base, changed) in arms.items():
        assert load(arm) == {**load(base), **changed}, arm
    epochs = load("train-student-epochs")
    assert epochs["epoch_eval"] is True and epochs["epoch_eval_split"] == "val"
    assert epochs["train"]["batch_size"] == load("train-student")["train"]["batch_size"]
    # the sweep: the student's recipe with the length and distill_weight left to the Makefile, scored on val
    sweep, base = load("train-student-sweep"), load("train-student")
    assert sweep["epoch_eval"] is True and sweep["epoch_eval_split"] == "val" and sweep["eval"] == {"sets": []}
    assert {k: v for k, v in sweep["train"].items() if k != "steps"} == \
        {k: v for k, v in base["train"].items() if k != "steps"}
    assert sweep["teacher_epoch"] == base["teacher_epoch"] and sweep["data"] == base["data"]


def test_train_detector_with_a_relative_out_keeps_ultralytics_inside_the_artifact(world, tmp_path):
    """A relative --out (as the Makefile passes): ultralytics puts a relative project under its
    settings' runs_dir (guessed from the git repository around its own package, or the cwd) —
    outside the artifact, where the stage then failed to find its results."""
    r = subprocess.run([*VLA, "train-detector", "--data", str(world), "--out", "det",
                        "--recipe", str(ROOT / "recipes/smoke/dclip/train-detector.yaml"), "--set", "epochs=1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "yolo"), "VLA_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "det" / "detector" / "weights.safetensors").exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "det" / "ultralytics").exists()


def test_recipes_dclip_cover_every_arm_and_validate():
    """`make dclip-ablations` / `dclip-epochs` with DCLIP_RECIPES=recipes/gpu/dclip resolve (every recipe
    they read exists) and every recipe there validates against its stage (ViT-L student included)."""
    from vla.recipes import load_recipe
    from vla.stages import eval_teacher, precompute_regions, train_detector, train_student, train_teacher
    from vla.stages.evaluate import EvalRecipe

    classes = {"train-detector": train_detector.TrainDetectorRecipe, "eval-teacher": eval_teacher.EvalTeacherRecipe,
               "precompute-regions": precompute_regions.PrecomputeRegionsRecipe,
               "train-teacher": train_teacher.TrainTeacherRecipe, "train-student": train_student.TrainStudentRecipe,
               "eval": EvalRecipe}
    r = subprocess.run(["make", "-n", "dclip", "dclip-ablations", "dclip-epochs", "dclip-teachers", "dclip-sweep",
                        "dclip-seeds", "DCLIP_RECIPES=recipes/gpu/dclip", "DCLIP_RUNS=/nonexistent/dclip-dry-run",
                        "CLIP=clip-vit-b-16", "DETECTOR=/models/yolov8x.pt", "DATA=/data/shards", "EVAL=/data/eval"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    read = {p.split("recipes/gpu/dclip/")[1] for p in r.stdout.split() if "recipes/gpu/dclip/" in p}
    assert {"train-teacher-noregions.yaml", "train-teacher-average.yaml", "train-teacher-converged.yaml",
            "train-student-noteacher.yaml", "train-student-converged.yaml", "train-student-epochs.yaml",
            "eval-teacher.yaml", "train-student-sweep.yaml"} <= read
    import yaml

    for path in sorted((ROOT / "recipes" / "gpu" / "dclip").glob("*.yaml")):
        kind = yaml.safe_load(path.read_text())["kind"]
        cfg = load_recipe(classes[kind], path)
        if path.name == "train-student-vitl.yaml":
            assert cfg.preserve_weight > 0 and cfg.rope_2d and cfg.clusters == 3


# --- eval-teacher ---------------------------------------------------------------------------------


def test_eval_teacher_scores_teachers_on_held_out_regions_beside_the_base_clip(oracle_regions, world, tmp_path):
    """`vla eval-teacher TEACHER:N --regions VAL`: a teacher row and the base CLIP's row on the same
    held-out images and captions (the val split's oracle table, matched to the teacher by its
    detector), recall in [0, 1], a results.md that `python -m vla.docs eval` makes a page of; a
    table of the teacher's own training images and an epoch it did not save are refused in one line."""
    from vla.docs import eval_page

    r = vla("train-teacher", "--regions", oracle_regions, "--out", tmp_path / "teacher", *TEACHER)
    assert r.returncode == 0, r.stderr
    r = vla("precompute-regions", "--data", world, "--out", tmp_path / "val", "--detector", "oracle",
            "--clip", _manifest(oracle_regions)["inputs"]["clip"]["path"], *REGION_SETTINGS, "--set", "split=val")
    assert r.returncode == 0, r.stderr
    r = vla("eval-teacher", f"{tmp_path / 'teacher'}:2", "--regions", tmp_path / "val", "--out", tmp_path / "ev",
            "--images", "15")
    assert r.returncode == 0, r.stderr + r.stdout
    m = _manifest(tmp_path / "ev")
    assert m["kind"] == "eval-teacher" and m["recipe"]["images"] == 15
    rows = json.loads((tmp_path / "ev" / "results.json").read_text())
    teacher_row = "teacher (teacher, epoch 2) on val"
    assert list(rows) == ["CLIP (clip) on val", teacher_row]
    for row in rows.values():
        metrics = row["val_retrieval"]
        assert metrics["n_images"] == 15 and metrics["n_texts"] >= 15
        assert all(0 <= metrics[k] <= 1 for k in ("image_retrieval_recall@1", "text_retrieval_recall@1", "mean_recall"))
        assert -1 <= metrics["negative_cos"] <= 1 and -1 <= metrics["output_cos_across_images"] <= 1
    assert m["teachers"][0]["epoch"] == 2
    assert teacher_row in eval_page("t", tmp_path / "ev", "make dclip-teachers")

    r = cli("eval-teacher", tmp_path / "teacher", "--regions", oracle_regions, "--out", tmp_path / "e2")
    assert r.exit_code == 2 and "held-out images" in r.output and not (tmp_path / "e2").exists()
    r = cli("eval-teacher", f"{tmp_path / 'teacher'}:9", "--regions", tmp_path / "val", "--out", tmp_path / "e3")
    assert r.exit_code == 2 and "not 9" in r.output
