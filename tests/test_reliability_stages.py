"""Reliability of the DCLIP, MM-GEM and export stages, through the CLI as a user (or an attacker)
runs them: a detector `.pt` never runs code, a per-sample table from another data set is never
paired silently, damaged files are one-line errors (or recomputed cache entries), a stream cut at
a tar boundary is truncated whatever its address, and `eval-merge`, `models`, the MM-GEM export
and `--out` inside a brace-expanded `--data` refuse what they cannot do."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vla.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
WORLD = ["--set", "n_train=24", "--set", "n_val=8", "--set", "n_test=40", "--set", "image_size=32",
         "--set", "shard_size=12", "--set", "workers=1"]
REGIONS = ["--detector", "oracle", "--clip", "vla-micro-clip", "--set", "detect.imgsz=32", "--set", "shard_size=12",
           "--set", "detect.batch_size=8"]
TEACHER = ["--set", "epochs=1", "--set", "train.batch_size=8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The one line a refused command printed (exit 2, no traceback)."""
    text = result.output
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("train step ", "caching "))]
    assert result.exit_code == 2, text
    assert len(lines) == 1, text
    assert "Traceback" not in text and "internal error" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two tiny worlds whose sample keys are the same and whose images and captions are not."""
    root = tmp_path_factory.mktemp("worlds")
    for name, seed in (("A", 0), ("B", 1)):
        r = invoke("synth", "--out", root / name, *WORLD, "--set", f"seed={seed}")
        assert r.exit_code == 0, r.output
    return root / "A", root / "B"


@pytest.fixture(scope="module")
def regions_a(worlds):
    out = worlds[0].parent / "regions-A"
    r = invoke("precompute-regions", "--data", worlds[0], "--out", out, *REGIONS)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def teacher_a(worlds, regions_a):
    out = worlds[0].parent / "teacher-A"
    r = invoke("train-teacher", "--regions", regions_a, "--data", worlds[0], "--out", out, *TEACHER)
    assert r.exit_code == 0, r.output
    return out


# --- 1. a detector .pt never runs code ----------------------------------------------------------


class _WritesAFile:
    """A pickle payload: unpickling it writes `path` (as an attacker's `.pt` would run anything)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def test_a_detector_pt_whose_pickle_runs_code_is_refused_by_name_before_it_runs(worlds, tmp_path):
    """`precompute-regions --detector evil.pt`: exit 2, one line naming the file and the refused
    global (`builtins.exec`), and the payload never ran (its file does not exist)."""
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _WritesAFile(marker), "train_args": {}}, evil)
    r = invoke("precompute-regions", "--data", worlds[0], "--out", tmp_path / "r", "--detector", evil,
               "--clip", "vla-micro-clip")
    line = one_line_error(r)
    assert str(evil) in line and "builtins.exec" in line and "refused" in line
    assert not marker.exists()
    assert not (tmp_path / "r").exists()


def test_a_module_class_called_with_arguments_is_refused_at_load_time(tmp_path):
    """An allowed class used as a function (its constructor would run with the pickle's arguments)
    is refused by the restricted unpickler itself, beyond the scan of names."""
    from vla.errors import UserError
    from vla.models.safe_pickle import load_checkpoint
    from vla.offline import import_ultralytics

    import_ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    class Calls:
        def __reduce__(self):
            return (DetectionModel, (str(tmp_path / "x.yaml"),))

    torch.save({"model": Calls()}, tmp_path / "calls.pt")
    with pytest.raises(UserError, match="calling ultralytics.nn.tasks.DetectionModel"):
        load_checkpoint(tmp_path / "calls.pt", what="detector")


def test_ultralytics_checkpoints_load_through_the_restricted_unpickler(tmp_path):
    """A YOLO saved by ultralytics' own `.save()` loads through vla's unpickler with the weights,
    class names and outputs ultralytics' own loader gives, without ultralytics reading the file."""
    from vla.models.dclip.yolo import load_detector
    from vla.offline import import_ultralytics, torch_threads_kept

    ultralytics = import_ultralytics()
    with torch_threads_kept():
        built = ultralytics.YOLO("yolov8n.yaml")
    pt = tmp_path / "yolo.pt"
    built.save(str(pt))
    ours = load_detector(str(pt))
    with torch_threads_kept():
        theirs = ultralytics.YOLO(str(pt))
    assert ours.task == "detect" and ours.model.names == theirs.model.names
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.model.eval()(x)[0], theirs.model.eval()(x)[0], rtol=0, atol=0)


def test_train_detector_refuses_a_pretrained_weights_file(worlds, tmp_path):
    """ultralytics would unpickle `overrides.pretrained` unrestricted: refused in one line."""
    recipe = tmp_path / "det.yaml"
    recipe.write_text("kind: train-detector\nmodel: yolov8n.yaml\noverrides:\n  pretrained: evil.pt\n")
    r = invoke("train-detector", "--data", worlds[0], "--out", tmp_path / "d", "--recipe", recipe)
    assert "overrides.pretrained" in one_line_error(r)


def test_train_detector_refuses_a_data_yaml_with_a_download_script(tmp_path):
    """ultralytics would run a data.yaml's `download:` when its images are missing: refused in one
    line before anything runs."""
    marker = tmp_path / "payload-ran"
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: {{0: a}}\n"
                    f"download: open({str(marker)!r}, 'w').write('ran')\n")
    r = invoke("train-detector", "--data", data, "--out", tmp_path / "d", "--recipe",
               ROOT / "recipes/smoke/dclip/train-detector.yaml")
    line = one_line_error(r)
    assert str(data) in line and "download:" in line
    assert not marker.exists()


def test_a_label_cache_whose_pickle_runs_code_is_rebuilt_not_loaded(tmp_path):
    """ultralytics' label cache (`labels/train.cache`, a pickle it loads with allow_pickle) is read
    by the restricted unpickler during train-detector: a cache whose payload writes a file is not
    loaded (ultralytics rebuilds it from the labels) and the run finishes."""
    import numpy as np

    from vla.models.safe_pickle import Refused, load_npy_object

    r = invoke("synth", "--out", tmp_path / "w", *WORLD)
    assert r.exit_code == 0, r.output
    marker = tmp_path / "payload-ran"
    cache = tmp_path / "w" / "yolo" / "labels" / "train.cache"
    evil = np.empty((), dtype=object)
    evil[()] = {"version": "x", "payload": _WritesAFile(marker)}
    with open(cache, "wb") as f:
        np.save(f, evil, allow_pickle=True)
    with pytest.raises(Refused, match="builtins.exec"):
        load_npy_object(cache)
    r = invoke("train-detector", "--data", tmp_path / "w", "--out", tmp_path / "d", "--recipe",
               ROOT / "recipes/smoke/dclip/train-detector.yaml", "--set", "epochs=1", "--set", "imgsz=32")
    assert r.exit_code == 0, r.output
    assert not marker.exists()
    assert load_npy_object(cache)["version"] != "x"  # ultralytics wrote its own cache over it


# --- 2. a per-sample table from another data set is refused -------------------------------------


def test_regions_of_another_world_are_refused_by_train_teacher(worlds, regions_a, tmp_path):
    """Worlds A and B share their sample keys: A's regions with --data B are refused (the data
    digest the table records is not B's), naming both; nothing is written."""
    r = invoke("train-teacher", "--regions", regions_a, "--data", worlds[1], "--out", tmp_path / "t", *TEACHER)
    line = one_line_error(r)
    assert f"{regions_a} was built from other data" in line and str(worlds[1]) in line
    assert not (tmp_path / "t").exists()


def test_a_teacher_of_another_world_is_refused_by_train_student(worlds, teacher_a, tmp_path):
    """A teacher (and its regions) built from world A cannot train a student on world B."""
    r = invoke("train-student", "--teacher", teacher_a, "--data", worlds[1], "--out", tmp_path / "s",
               "--set", "train.batch_size=8", "--set", "train.steps=1")
    line = one_line_error(r)
    assert "was built from other data" in line and str(worlds[1]) in line
    assert not (tmp_path / "s").exists()


class _Crash(Exception):
    pass


def test_an_unfinished_run_is_not_resumed_on_other_data(worlds, tmp_path, monkeypatch):
    """precompute-regions stopped after its first shard of world A is not resumed with --data B
    (the finished shards are A's): refused in one line naming the input; --force starts over."""
    from vla.recipes import load_recipe
    from vla.stages import precompute_regions as stage

    out = tmp_path / "r"
    cfg = load_recipe(stage.PrecomputeRegionsRecipe, None, ["detector=oracle", "clip=vla-micro-clip",
                                                            "detect.imgsz=32", "shard_size=12", "detect.batch_size=8"])
    real, calls = stage.regions_of_batch, []

    def crash_in_shard_two(*args, **kw):
        calls.append(1)
        if len(calls) == 3:  # batches of 8 in shards of 12: calls 1-2 are shard 0, the 3rd is in shard 1
            raise _Crash
        return real(*args, **kw)

    monkeypatch.setattr(stage, "regions_of_batch", crash_in_shard_two)
    with pytest.raises(_Crash):
        stage.run(cfg, worlds[0], out)
    assert [p.name for p in sorted((tmp_path / ".r.partial" / "regions").glob("shard-*"))] == ["shard-00000"]
    monkeypatch.setattr(stage, "regions_of_batch", real)
    r = invoke("precompute-regions", "--data", worlds[1], "--out", out, *REGIONS)
    line = one_line_error(r)
    assert "holds an unfinished run with other settings (input data: digest" in line and "--force" in line
    r = invoke("precompute-regions", "--data", worlds[1], "--out", out, *REGIONS, "--force")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert not m["resumed"] and m["inputs"]["data"]["path"] == str(worlds[1])


# --- 3. damaged files are one line naming the file (or, in the cache, recomputed) -----------------


@pytest.fixture(scope="module")
def yolo_artifact(tmp_path_factory):
    """A train-detector artifact holding an untrained yolov8n (as `vla train-detector` stores it)."""
    from vla.artifacts import ArtifactBuilder
    from vla.models.dclip.detector import DETECTOR_DIR, save_yolo
    from vla.offline import import_ultralytics, torch_threads_kept

    ultralytics = import_ultralytics()
    with torch_threads_kept():
        model = ultralytics.YOLO("yolov8n.yaml")
    out = tmp_path_factory.mktemp("yolo") / "detector"
    with ArtifactBuilder(out, "train-detector", recipe={"model": "yolov8n.yaml"}) as art:
        save_yolo(model, art.dir / DETECTOR_DIR)
    return out


@pytest.mark.parametrize("cut", ["a few bytes", "half"])
def test_a_cut_detector_weights_file_is_one_line(worlds, yolo_artifact, tmp_path, cut):
    """A train-detector artifact whose weights.safetensors is cut (by a few bytes, or to half its
    size) is refused naming the file and `vla train-detector --force`."""
    det = tmp_path / "detector"
    shutil.copytree(yolo_artifact, det)
    weights = det / "detector" / "weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-7] if cut == "a few bytes" else data[:len(data) // 2])
    r = invoke("precompute-regions", "--data", worlds[0], "--out", tmp_path / "r", "--detector", det,
               "--clip", "vla-micro-clip")
    line = one_line_error(r)
    assert str(weights) in line and "vla train-detector --force" in line


@pytest.mark.parametrize("content", [b"", b"random"])
def test_an_empty_or_random_detector_pt_is_one_line(worlds, tmp_path, content):
    """`--detector x.pt` that is empty or random bytes: one line naming the file, exit 2."""
    pt = tmp_path / "x.pt"
    pt.write_bytes(os.urandom(4096) if content == b"random" else b"")
    r = invoke("precompute-regions", "--data", worlds[0], "--out", tmp_path / "r", "--detector", pt,
               "--clip", "vla-micro-clip")
    line = one_line_error(r)
    assert str(pt) in line and ("empty" in line if not content else "not a readable torch zip" in line)


@pytest.mark.parametrize("content", [b"", b"random"])
def test_an_empty_or_random_clip_checkpoint_is_one_line(worlds, tmp_path, content):
    """`--clip ARCH@x.pt` whose weights file is empty or random bytes: one line naming the file."""
    pt = tmp_path / "x.pt"
    pt.write_bytes(os.urandom(4096) if content == b"random" else b"")
    r = invoke("precompute-regions", "--data", worlds[0], "--out", tmp_path / "r", "--detector", "oracle",
               "--clip", f"vla-micro-clip@{pt}")
    line = one_line_error(r)
    assert str(pt) in line and ("empty" in line if not content else "damaged" in line)


def test_a_cut_region_shard_is_one_line(worlds, regions_a, tmp_path):
    """A regions table whose shard array is cut: train-teacher names the file and the rebuild."""
    regions = tmp_path / "regions"
    shutil.copytree(regions_a, regions)
    emb = regions / "regions" / "shard-00000" / "emb.npy"
    emb.write_bytes(emb.read_bytes()[:-100])
    r = invoke("train-teacher", "--regions", regions, "--data", worlds[0], "--out", tmp_path / "t", *TEACHER)
    line = one_line_error(r)
    assert str(emb) in line and "vla precompute-regions --force" in line


def test_a_cut_feature_cache_entry_is_computed_again(worlds, tmp_path, monkeypatch):
    """A feature-cache entry whose features.npy is cut is recomputed by the next run that needs it
    (`vla distill`, exit 0), which leaves it whole again."""
    import numpy as np

    from vla.cache import cache_root

    monkeypatch.setenv("VLA_CACHE_DIR", str(tmp_path / "cache"))
    distill = ["distill", "--data", worlds[0], "--teacher", "vla-tiny-clip", "--embedder", "vla-tiny-qwen",
               "--set", "train.steps=1", "--set", "train.batch_size=4"]
    r = invoke(*distill, "--out", tmp_path / "d1")
    assert r.exit_code == 0, r.output
    entries = sorted(cache_root().glob("*/features.npy"))
    assert entries
    whole = {p: np.load(p).shape for p in entries}
    entries[0].write_bytes(entries[0].read_bytes()[:-1000])
    r = invoke(*distill, "--out", tmp_path / "d2")
    assert r.exit_code == 0, r.output
    assert {p: np.load(p).shape for p in entries} == whole

# --- 4. a stream cut at a tar boundary is truncated, whatever its address --------------------------


@pytest.mark.parametrize("cut", ["between members", "whole"])
def test_a_piped_tar_cut_at_a_header_boundary_is_refused_like_a_local_one(tmp_path, cut):
    """`--data 'pipe:cat SHARD'` where SHARD is cut exactly between two members (a 512-byte
    boundary) is refused as truncated, as the same file read locally is; an intact one trains."""
    import tarfile

    from tests.test_reliability import PRETRAIN, write_shards

    shard = write_shards(tmp_path / "d")[0]
    if cut == "between members":
        with tarfile.open(shard) as tar:
            cut_at = tar.getmembers()[4].offset
        assert cut_at % 512 == 0
        shard.write_bytes(shard.read_bytes()[:cut_at])
    r = invoke("pretrain", "--data", f"pipe:cat {shard}", "--out", tmp_path / "run", *PRETRAIN,
               "--set", "train.steps=1", "--set", "train.batch_size=2")
    if cut == "whole":
        assert r.exit_code == 0, r.output
        return
    line = one_line_error(r)
    assert f"pipe:cat {shard} is truncated (it ends at byte {cut_at}" in line and "re-download that shard" in line


# --- 5. eval-merge and models refuse what they cannot read or must not write --------------------


@pytest.fixture()
def eval_artifact(tmp_path):
    """A directory with vla's results.json, as `vla eval` writes it."""
    d = tmp_path / "eval"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({"m": {"retrieval": {"mean_recall": 0.5}}}))
    return d


def test_eval_merge_never_writes_over_an_input(eval_artifact, tmp_path):
    """--out equal to an input, inside it, or containing it is refused, and the input is unchanged."""
    before = (eval_artifact / "results.json").read_bytes()
    for out in (eval_artifact, eval_artifact / "merged", tmp_path):
        line = one_line_error(invoke("eval-merge", eval_artifact, "--out", out))
        assert f"--out {out}" in line and "never writes over its inputs" in line
    assert (eval_artifact / "results.json").read_bytes() == before
    assert not (eval_artifact / "merged").exists()


def test_eval_merge_refuses_a_json_list_and_an_out_that_is_a_file(eval_artifact, tmp_path):
    """A results directory holding a JSON list, and an --out that is an existing file, are one line each."""
    results = tmp_path / "cb"
    results.mkdir()
    (results / "a.json").write_text("[1, 2]")
    line = one_line_error(invoke("eval-merge", results, "--out", tmp_path / "m"))
    assert str(results / "a.json") in line and "JSON list" in line
    taken = tmp_path / "taken.txt"
    taken.write_text("keep")
    line = one_line_error(invoke("eval-merge", eval_artifact, "--out", taken))
    assert "is an existing file" in line and taken.read_text() == "keep"


def test_models_skips_a_list_shaped_manifest(tmp_path):
    """`vla models DIR` where another tool left a list-shaped manifest.json lists DIR's models
    and ignores that file (exit 0)."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('["not", "an", "artifact"]')
    r = invoke("models", tmp_path)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "other" not in r.output.split("Also:")[-1]


# --- 6. an MM-GEM export checks its tokenizer's [EMB]/[CAP] ids -----------------------------------


def _swap_emb_and_cap(lm_dir: Path) -> None:
    """Swap the `[EMB]` and `[CAP]` tokens in a saved tokenizer (each keeps the other's id)."""
    for f in lm_dir.glob("*token*.json"):
        text = f.read_text()
        f.write_text(text.replace('"[EMB]"', '"@@@"').replace('"[CAP]"', '"[EMB]"').replace('"@@@"', '"[CAP]"'))


@pytest.fixture(scope="module")
def mmgem_artifact(tmp_path_factory):
    """A joint-train artifact holding a tiny MM-GEM (vla-micro-clip tower + a tiny Llama)."""
    from vla.artifacts import ArtifactBuilder
    from vla.models.mmgem import MMGEMConfig, build_mmgem, save_mmgem

    captions = ["a small red circle", "a large blue square", "two yellow stars", "the orange circle"]
    model = build_mmgem("vla-micro-clip", None, captions, MMGEMConfig(max_text_tokens=8))
    out = tmp_path_factory.mktemp("mmgem") / "joint"
    with ArtifactBuilder(out, "joint-train", recipe={}) as art:
        save_mmgem(model, art.dir / "model")
        art.extra["mmgem"] = {"tokens": model.token_ids}
    return out


def test_an_mmgem_tokenizer_with_emb_and_cap_swapped_is_refused_by_export_and_load(mmgem_artifact, tmp_path):
    """Swapped [EMB]/[CAP] (both present, at each other's ids): `vla export` refuses the artifact
    and `vla.load` refuses an export, naming the tokens and the recorded ids."""
    import vla
    from vla.errors import UserError

    broken = tmp_path / "joint"
    shutil.copytree(mmgem_artifact, broken)
    _swap_emb_and_cap(broken / "model" / "lm")
    line = one_line_error(invoke("export", broken, "--out", tmp_path / "export"))
    assert "mode tokens are not the ids" in line and "[EMB] is id" in line
    assert not (tmp_path / "export").exists()

    r = invoke("export", mmgem_artifact, "--out", tmp_path / "good")
    assert r.exit_code == 0, r.output
    vla.load(tmp_path / "good")  # intact: loads
    _swap_emb_and_cap(tmp_path / "good" / "lm")
    with pytest.raises(UserError, match=r"mode tokens are not the ids.*\[EMB\] is id"):
        vla.load(tmp_path / "good")


# --- 7. --out inside a brace-expanded --data ------------------------------------------------------


@pytest.mark.parametrize("spec", ["{00000..00001}.tar", "*.tar"])
def test_out_inside_a_brace_expanded_data_is_refused_like_the_directory(worlds, spec):
    """`--data 'W/train/{00000..00001}.tar' --out W/train/run` (or a glob) is refused as the plain
    `--data W/train` is: the run would be written among the data's shards."""
    train = worlds[0] / "train"
    plain = one_line_error(invoke("pretrain", "--data", train, "--out", train / "run", "--model", "vla-micro-clip"))
    line = one_line_error(invoke("pretrain", "--data", f"{train}/{spec}", "--out", train / "run",
                                 "--model", "vla-micro-clip"))
    assert f"--out {train / 'run'} lies inside the data input {train.resolve()}" in line
    assert "lies inside the data input" in plain
    assert not (train / "run").exists() and not (train / ".run.partial").exists()


@pytest.mark.parametrize("evil", ["activation", "layer"])
def test_a_detector_model_yaml_that_would_run_code_is_refused(worlds, tmp_path, evil):
    """ultralytics `eval()`s a model config's `activation` and calls any name of its module's
    globals as a layer: `--detector evil.yaml` with either is refused in one line, nothing runs."""
    import yaml

    from vla.offline import import_ultralytics

    import_ultralytics()
    from ultralytics.cfg import ROOT as ULTRALYTICS

    cfg = yaml.safe_load((ULTRALYTICS / "cfg/models/v8/yolov8.yaml").read_text())
    marker = tmp_path / "payload-ran"
    if evil == "activation":
        cfg["activation"] = f"__import__('os').system('touch {marker}')"
    else:
        cfg["backbone"][0] = [-1, 1, "torch_safe_load", [str(tmp_path / "other.pt")]]
    path = tmp_path / "yolov8n.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = invoke("precompute-regions", "--data", worlds[0], "--out", tmp_path / "r", "--detector", path,
               "--clip", "vla-micro-clip")
    line = one_line_error(r)
    assert f"model config {path} refused" in line and ("activation" in line if evil == "activation"
                                                        else "'torch_safe_load'" in line)
    assert not marker.exists()
