"""Reliability, through the CLI as a user runs it (issue #8 and the resume parts of #10 / #11):
`--force` never deletes inputs or foreign files, one writer per `--out`, skip limits that hold
across reruns with counts that survive a resume, one-line user errors for every user mistake,
and a rerun that does what the message said it would."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vla.artifacts import ArtifactBuilder, checkpoint_step, claim_out, lock_path, partial_dir, release_all
from vla.cli import app
from vla.data.sample import Sample
from vla.data.shards import ShardWriter
from vla.errors import UserError
from tests.test_cli import VLA, vla

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
PRETRAIN = ["--model", "vla-micro-clip", "--set", "train.batch_size=8", "--set", "train.warmup_steps=2",
            "--set", "eval.sets=[]"]


def invoke(*args) -> "Result":
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(text: str) -> str:
    # progress lines (printed outside a terminal, vla/progress.py) are the log, not the error
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("train step ", "caching "))]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "internal error" not in text, text
    return lines[0]


def write_pairs(root: Path, n_good: int, bad_at: tuple[int, ...] = ()) -> Path:
    """A JSONL manifest of `n_good` 32-px image–caption pairs, with a line that is not JSON at each
    0-based line index in `bad_at`."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        good.append(json.dumps({"image": f"img/{i}.png", "caption": f"picture number {i}"}))
    lines = list(good)
    for i in sorted(bad_at):
        lines.insert(i, "{this line is not json")
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root / "train.jsonl"


def write_shards(root: Path, n: int = 12) -> list[Path]:
    rng = np.random.default_rng(1)
    with ShardWriter(root, maxcount=6, image_format="png") as w:
        for i in range(n):
            w.write(Sample(f"s{i:03d}", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                           [f"sample {i}"]))
    return w.shards


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- data loss ----------------------------------------------------------------------------------

def test_force_never_writes_over_an_input_or_its_lineage(tmp_path):
    """#8.1: `--out` that is, contains or lies inside an input (or its lineage) is refused."""
    data = tmp_path / "shards"
    write_shards(data)
    before = snapshot(data)
    for out, how in ((data, "is"), (data / "run", "lies inside"), (tmp_path, "contains")):
        r = invoke("pretrain", "--data", data, "--out", out, "--force", *PRETRAIN, "--set", "train.steps=2")
        assert r.exit_code == 2, r.output
        assert f"--out {out} {how} the data input {data}" in one_line_error(r.output)
    assert snapshot(data) == before
    assert not list(tmp_path.glob(".*"))  # no partial, no lock left behind

    # lineage: a finished artifact trained on `data` is exported over `data`
    with ArtifactBuilder(tmp_path / "pre", "pretrain", recipe={}, inputs={
            "data": {"path": str(data), "kind": "data", "digest": "d"}}, command=["test"]) as art:
        (art.dir / "w.bin").write_bytes(b"w")
    r = invoke("export", tmp_path / "pre", "--out", data, "--force")
    assert r.exit_code == 2
    assert f"is the data (in the lineage of model) input {data}" in one_line_error(r.output)
    assert snapshot(data) == before


def test_force_replaces_only_a_vla_artifact_or_an_empty_directory(tmp_path):
    """#8.2: a directory with content that is not a vla artifact is refused even with --force, and
    the message no longer suggests --force."""
    data = write_pairs(tmp_path / "d", 4)
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    (mine / "shards" / "00000.tar").write_bytes(b"precious")
    (mine / "notes.txt").write_text("keep me")
    for force in ([], ["--force"]):
        r = invoke("pretrain", "--data", data, "--out", mine, *force, *PRETRAIN, "--set", "train.steps=2")
        assert r.exit_code == 2, r.output
        line = one_line_error(r.output)
        assert f"{mine} exists and is not a vla artifact" in line and "--force" not in line
    assert (mine / "shards" / "00000.tar").read_bytes() == b"precious"
    assert (mine / "notes.txt").read_text() == "keep me"
    # the input check comes first when the foreign directory holds the data (the reported case)
    r = invoke("pretrain", "--data", data, "--out", data.parent, "--force", *PRETRAIN)
    assert r.exit_code == 2 and "contains the data input" in one_line_error(r.output)
    assert data.exists()
    # what --force may replace: an empty directory, a vla artifact; an --out in new directories is fine
    (tmp_path / "empty").mkdir()
    claim_out(tmp_path / "empty", force=True)
    claim_out(tmp_path / "new" / "dirs" / "run", force=False)
    assert lock_path(tmp_path / "new" / "dirs" / "run").exists()
    release_all()
    with ArtifactBuilder(tmp_path / "art", "eval", recipe={}, command=["test"]) as art:
        (art.dir / "r.json").write_text("{}")
    claim_out(tmp_path / "art", force=True)
    with pytest.raises(UserError, match="already a finished 'eval' artifact; pass --force"):
        claim_out(tmp_path / "art", force=False)


# --- wrong results without a word ---------------------------------------------------------------

def test_skip_limit_holds_on_rerun_counts_survive_resume_and_a_raised_limit_resumes(tmp_path):
    """#8.3 and #11.7: a run over the skip limit saves no final checkpoint, so its rerun fails
    again; each bad line is counted once (not per epoch) and named; `vla inspect` says the run
    stopped and why; raising the limit (a setting that changes no result) resumes, and the
    manifest counts the samples before the resume too."""
    data = write_pairs(tmp_path / "d", 36, bad_at=(3, 10, 20, 30))  # 4 of 40 lines: 10 %
    out = tmp_path / "run"
    args = ["pretrain", "--data", data, "--out", out, *PRETRAIN, "--set", "train.steps=10",
            "--set", "train.checkpoint_every=4"]  # 80 samples: more than two epochs of 36
    first = invoke(*args)
    assert first.exit_code == 1, first.output
    line = one_line_error(first.output)
    assert "4 of 40 samples" in line and "(bad_json: 4)" in line, line
    named = {f"train.jsonl line {i + 1} (bad_json)" for i in (3, 10, 20, 30)}  # in the order read
    assert all(n in line for n in named)
    assert "--set data.max_skip_fraction=0.1" in line
    assert checkpoint_step(out) == 8  # not 10: the last step's checkpoint would have passed the check

    r = invoke("inspect", out)
    assert r.exit_code == 2
    line = one_line_error(r.output)
    assert "its run stopped: 4 of 40 samples" in line and "resume from step 8" in line
    assert "interrupted" not in line

    again = invoke(*args)
    assert again.exit_code == 1 and "4 of 40 samples" in again.output, again.output

    raised = invoke(*args, "--set", "data.max_skip_fraction=0.1")
    assert raised.exit_code == 0, raised.output
    assert "resuming from step 8 of 10" in raised.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["resumed"] is True and m["recipe"]["data"]["max_skip_fraction"] == 0.1
    counts = m["counts"]["train"]
    assert (counts["seen"], counts["used"], counts["skipped"]) == (40, 36, {"bad_json": 4})
    assert sorted(counts["examples"]) == sorted(named)
    assert counts["samples"] == 80
    assert not (out / "checkpoints").exists() and not (out / "stopped.json").exists()


def test_two_writers_on_one_out(tmp_path):
    """#8.4: two real processes on one --out: the second exits 2 naming the first's pid; the
    live run is "being built", not "interrupted"; the first's files are its own. Ctrl-C then
    stops the first at a step boundary with a checkpoint, and says so (#11.8)."""
    data = write_pairs(tmp_path / "d", 24)
    out = tmp_path / "run"
    cmd = [*VLA, "pretrain", "--data", str(data), "--out", str(out), *PRETRAIN, "--set", "train.steps=5000",
           "--set", "train.log_every=1", "--set", "train.checkpoint_every=1000"]
    env = {**os.environ, "VLA_NO_PROGRESS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = partial_dir(out) / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)

        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 2, second.stderr
        line = one_line_error(second.stderr)
        assert f"{out} is being built by another vla run (pid {first.pid} on " in line, line
        assert lock_path(out).exists()

        r = invoke("inspect", out)
        assert r.exit_code == 2
        assert f"{out} is being built right now (pid {first.pid}" in r.output and "interrupted" not in r.output
        assert first.poll() is None, "the first run must have been alive throughout"
    finally:
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one writer's records, none interleaved
    n = checkpoint_step(out)
    assert n == steps[-1] < 1000  # a checkpoint at the step it stopped at, before the first periodic one
    assert f"stopped by SIGINT at step {n} of 5000; checkpoint saved: rerun the same command to resume " \
           f"from step {n}" in err
    assert not lock_path(out).exists()


def test_a_tar_cut_at_a_header_boundary_is_refused(tmp_path):
    """#8.6: a shard cut exactly between two members (a 512-byte boundary) is truncated, not short."""
    (shard, _) = write_shards(tmp_path / "d")
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    cut_at = members[len(members) // 2].offset  # the header of a member in the middle
    assert cut_at % 512 == 0
    shard.write_bytes(shard.read_bytes()[:cut_at])
    r = invoke("pretrain", "--data", tmp_path / "d", "--out", tmp_path / "run", *PRETRAIN, "--set", "train.steps=2")
    assert r.exit_code == 2, r.output
    line = one_line_error(r.output)
    assert f"{shard} is truncated (it ends at byte {cut_at}" in line and "re-download that shard" in line


# --- user mistakes are one line and exit 2 ------------------------------------------------------

def test_out_that_is_a_file_or_under_a_file(tmp_path):
    """#8.7, #8.8."""
    data = write_pairs(tmp_path / "d", 4)
    f = tmp_path / "file.txt"
    f.write_text("x")
    r = invoke("pretrain", "--data", data, "--out", f, *PRETRAIN)
    assert r.exit_code == 2 and f"--out {f} is an existing file" in one_line_error(r.output)
    r = invoke("pretrain", "--data", data, "--out", f / "sub" / "run", *PRETRAIN)
    assert r.exit_code == 2 and f"{f} is a file, not a directory" in one_line_error(r.output)
    assert f.read_text() == "x"


def _as_nobody() -> list[str] | None:
    """A command prefix that runs Python as the unprivileged user `nobody` (root ignores file modes),
    or None. The venv's interpreter may live where nobody cannot read (/root): then the system's
    Python of the same version runs with the venv's packages on its path."""
    if os.geteuid() != 0:
        return []  # already unprivileged
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in (sys.executable, shutil.which(version), f"/usr/bin/{version}"):
        if not python:
            continue
        cmd = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", python]
        ok = subprocess.run([*cmd, "-c", "import sys; assert sys.version_info[:2] == (%d, %d)"
                             % sys.version_info[:2]], capture_output=True, cwd="/")
        if ok.returncode == 0:
            return cmd
    return None


def test_out_in_a_directory_this_user_cannot_write(tmp_path):
    """#8.9, as a non-root user."""
    prefix = _as_nobody()
    if prefix is None:
        pytest.skip("no way to run as a non-root user here (no setpriv, or no Python nobody can run)")
    base = Path(tempfile.mkdtemp(prefix="vla-ro-", dir="/tmp"))  # pytest's tmp_path is private to root
    try:
        base.chmod(0o755)
        data = write_pairs(base / "d", 4)
        readonly = base / "readonly"
        readonly.mkdir(mode=0o755)  # owned by root: nobody may read it, not write it
        home = base / "home"  # the user's own home and caches, not root's
        home.mkdir()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(home, nobody.pw_uid, nobody.pw_gid)
        paths = [str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "VLA_NO_PROGRESS": "1",
               "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "YOLO_CONFIG_DIR": str(home / ".yolo")}
        proc = subprocess.run([*prefix, "-m", "vla", "pretrain", "--data", str(data), "--out",
                               str(readonly / "run"), *PRETRAIN], capture_output=True, text=True, env=env,
                              cwd=str(base), timeout=300)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = one_line_error(proc.stderr)
        assert f"--out {readonly / 'run'}: cannot create it, {readonly} is not writable for this user" in line
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_binary_recipe_names_the_file(tmp_path):
    """#8.10."""
    recipe = tmp_path / "model.yaml"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary")
    r = invoke("synth", "--out", tmp_path / "w", "--recipe", recipe)
    assert r.exit_code == 2
    assert f"recipe {recipe} is not a text file" in one_line_error(r.output)


def test_numbers_in_set_and_recipes_read_as_a_user_means_them(tmp_path):
    """#8.11: `--set train.lr=1e-3`, the example in --set's own help, is a number; so is 2e-4 in a file."""
    recipe = tmp_path / "p.yaml"
    recipe.write_text("kind: pretrain\ntrain:\n  min_lr: 2e-5\n  steps: 100\n")
    r = invoke("recipe", "show", recipe, "--set", "train.lr=1e-3", "--set", "train.eps=1.0E-8")
    assert r.exit_code == 0, r.output
    assert "lr: 0.001" in r.output and "min_lr: 2.0e-05" in r.output and "eps: 1.0e-08" in r.output
    assert "steps: 100" in r.output  # integers stay integers


def test_a_pickled_embedder_is_one_line_without_torch_advice(tmp_path):
    """#8.12: a pickle pytorch_model.bin in an --embedder directory."""
    from vla.models.embedder import build_tiny_qwen

    model, tokenizer = build_tiny_qwen()
    emb = tmp_path / "emb"
    model.config.save_pretrained(emb)
    tokenizer.save_pretrained(emb)
    torch.save({"when": datetime.datetime(2020, 1, 1)}, emb / "pytorch_model.bin")  # needs a global to load
    data = write_pairs(tmp_path / "d", 4)
    r = invoke("distill", "--data", data, "--out", tmp_path / "run", "--teacher", "vla-micro-clip",
               "--embedder", emb, "--pooling", "mean")
    assert r.exit_code == 2, r.output
    line = one_line_error(r.output)
    assert f"{emb} holds pickled weights" in line and "weights_only" not in line


def test_a_pickled_checkpoint_is_one_line_without_torch_advice(tmp_path):
    """#8.13: a pickle checkpoints/last.pt in the partial of the run being resumed."""
    from vla.recipes import load_recipe, to_dict
    from vla.stages.pretrain import PretrainRecipe

    data = write_pairs(tmp_path / "d", 8)
    out = tmp_path / "run"
    sets = ["train.batch_size=8", "train.warmup_steps=2", "eval.sets=[]", "train.steps=2"]
    recipe = to_dict(load_recipe(PretrainRecipe, None, [*sets, "model=vla-micro-clip"]))
    ckpt = partial_dir(out) / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    (partial_dir(out) / "resume.json").write_text(json.dumps({"kind": "pretrain", "recipe": recipe}))
    torch.save({"when": datetime.datetime(2020, 1, 1)}, ckpt)
    r = invoke("pretrain", "--data", data, "--out", out, "--model", "vla-micro-clip",
               *[a for s in sets for a in ("--set", s)])
    assert r.exit_code == 2, r.output
    line = one_line_error(r.output)
    assert f"{ckpt} is not a vla checkpoint" in line and "delete it to start the run over" in line
    assert "weights_only" not in line


# --- also ------------------------------------------------------------------------------------

def test_a_kill_while_finishing_costs_nothing(tmp_path, monkeypatch):
    """#8 "Also": the partial is renamed into place before its checkpoints are removed, so a kill
    at the rename leaves a partial whose rerun resumes instead of retraining."""
    out = tmp_path / "run"
    real_replace = os.replace

    def killed_at_the_rename(src, dst):
        if Path(src) == partial_dir(out):
            raise KeyboardInterrupt  # the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        with ArtifactBuilder(out, "pretrain", recipe={"lr": 1.0}, command=["test"]) as art:
            (art.dir / "checkpoints").mkdir()
            (art.dir / "checkpoints" / "last.pt").write_bytes(b"state")
            (art.dir / "w.bin").write_bytes(b"w")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (partial_dir(out) / "checkpoints" / "last.pt").exists()
    with ArtifactBuilder(out, "pretrain", recipe={"lr": 1.0}, command=["test"]) as art:
        assert art.resumed and (art.dir / "checkpoints" / "last.pt").read_bytes() == b"state"
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["outputs"]) == ["w.bin"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "w.bin"]


def test_ctrl_c_outside_the_loop_says_what_a_rerun_does(tmp_path, capsys):
    """#11.8: a Ctrl-C before the first checkpoint does not promise a resume."""
    import typer

    from vla.cli import handles_errors

    @handles_errors
    def command(out: Path) -> None:
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(typer.Exit) as e:
        command(out=out)
    assert e.value.exit_code == 130
    assert "nothing was saved: rerunning the same command starts from the beginning" in capsys.readouterr().err
    ckpt = partial_dir(out) / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"x")
    (ckpt / "last.json").write_text(json.dumps({"step": 6, "samples": 48}))
    with pytest.raises(typer.Exit):
        command(out=out)
    assert "rerun the same command to resume from step 6" in capsys.readouterr().err


def test_torchrun_ranks_wait_for_rank_0_and_share_its_error(tmp_path):
    """#10.3: under torchrun no rank reads a partial (a stale checkpoint) that rank 0 is about to
    replace, and a user error on rank 0 is the same user error on every rank."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results = tmp_path / "results"
    results.mkdir()
    out = tmp_path / "run"  # holds a stale run that --force must replace
    (partial_dir(out) / "checkpoints").mkdir(parents=True)
    (partial_dir(out) / "checkpoints" / "last.pt").write_bytes(b"stale")
    (partial_dir(out) / "resume.json").write_text(json.dumps({"kind": "pretrain", "recipe": {"lr": 1}}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("artifact_ranks_worker.py")), str(out), str(foreign),
                           str(results)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["stale_checkpoint"] for s in seen] == [False, False]
    assert seen[0]["error"] == seen[1]["error"] and "foreign exists and is not a vla artifact" in seen[0]["error"]
    assert (out / "manifest.json").exists() and (foreign / "keep.txt").read_text() == "x"
