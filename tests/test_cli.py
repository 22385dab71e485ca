"""The CLI as a user runs it: Typer's CliRunner for speed, a real subprocess where the process
boundary matters (exit codes, no traceback, the console script)."""

import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from vla.cli import app

runner = CliRunner()
VLA = [sys.executable, "-m", "vla"]
SMALL_WORLD = ["--set", "n_train=60", "--set", "n_val=20", "--set", "n_test=40", "--set", "shard_size=25",
               "--set", "workers=1"]


def vla(*args, env=None):
    return subprocess.run([*VLA, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_every_command_with_a_description():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("synth", "inspect", "pretrain", "eval", "distill", "contrast-tune", "export", "recipe"):
        assert cmd in r.output
    assert "InfoNCE" in r.output  # the one-line descriptions are shown


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip().startswith("vla 0.")


def test_user_error_is_one_red_line_exit_2_without_traceback(tmp_path):
    r = vla("inspect", tmp_path / "missing")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "does not exist" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


def test_unknown_recipe_key_fails_naming_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: synth\nseed: 1\nn_trian: 5\n")
    r = vla("synth", "--out", tmp_path / "w", "--recipe", bad)
    assert r.returncode == 2
    assert "bad.yaml: unknown key 'n_trian'" in r.stderr
    assert not (tmp_path / "w").exists()


def test_recipe_show_prints_the_resolved_recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("kind: synth\nseed: 3\n")
    r = runner.invoke(app, ["recipe", "show", str(p), "--set", "n_train=7"])
    assert r.exit_code == 0, r.output
    assert "kind: synth" in r.output and "seed: 3" in r.output and "n_train: 7" in r.output
    assert "n_test:" in r.output  # defaults are filled in


def test_synth_then_inspect_then_verify(tmp_path):
    out = tmp_path / "toy"
    r = runner.invoke(app, ["synth", "--out", str(out), *SMALL_WORLD])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "synth" and m["counts"] and "long_text_prefix_ambiguous_fraction" in m["metrics"]
    # the world's knobs and what they give: stored size, fill patterns, the small objects' pixels
    assert {k: m["recipe"][k] for k in ("image_size", "pattern_period", "pattern_contrast", "probe_train")} == \
        {"image_size": 256, "pattern_period": 3.0, "pattern_contrast": 70, "probe_train": 2000}
    assert m["metrics"]["small_box_min_px"] >= 24
    assert {"regional", "grounding", "probe"} <= set(m["counts"]["eval"])
    assert "pattern_period" in runner.invoke(app, ["synth", "--help"]).output
    r = runner.invoke(app, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert "kind=synth" in r.output and "outputs match their sha256" in r.output
    # a finished artifact is not overwritten without --force
    r = vla("synth", "--out", out, *SMALL_WORLD)
    assert r.returncode == 2 and "already a finished 'synth' artifact; pass --force" in r.stderr
    # tampering is caught
    victim = next(p for p in sorted(out.rglob("*.tar")))
    victim.write_bytes(victim.read_bytes()[:-10] + b"0" * 10)
    r = vla("inspect", out, "--verify")
    assert r.returncode == 1 and "do not match the manifest" in r.stderr


def test_wrong_artifact_kind_refused_before_compute(tmp_path):
    out = tmp_path / "toy"
    assert runner.invoke(app, ["synth", "--out", str(out), *SMALL_WORLD]).exit_code == 0
    r = vla("contrast-tune", "--data", out, "--init", out, "--out", tmp_path / "ct")
    assert r.returncode == 2
    assert f"{out} is a 'synth' artifact; --init expects 'distill'" in r.stderr
    assert not (tmp_path / "ct").exists() and not (tmp_path / ".ct.partial").exists()
