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


#: every command of `vla`, by name: a new command is added here and to README.md's command table
COMMANDS = ("synth", "pretrain", "eval", "eval-merge", "export", "distill", "contrast-tune", "pretrain-lm",
            "joint-train", "stage2-roi", "train-detector", "precompute-regions", "train-teacher", "train-student", "eval-teacher", "inspect",
            "models", "recipe")


def _click_commands() -> dict:
    import typer.main

    return typer.main.get_command(app).commands


def test_help_lists_every_command_with_a_description():
    """The top-level help names all three methods and shows every command with its one-line description."""
    assert set(_click_commands()) == set(COMMANDS)
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in r.output
    for method in ("ProCLIP", "LLM2CLIP", "DCLIP", "MM-GEM"):
        assert method in r.output
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


# --- one CLI shape ----------------------------------------------------------------------------
from pathlib import Path  # noqa: E402

from vla import cli  # noqa: E402
from vla.recipes import shipped_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

DATA = "s3://b/{000..009}.tar"
#: the commands that train with vla's loop, and the recipe each takes in tests/CI
TRAINING = {"pretrain": [], "distill": [], "contrast-tune": ["--init", "x"], "pretrain-lm": [], "joint-train": [],
            "stage2-roi": ["--init", "x"], "train-teacher": ["--regions", "x"], "train-student": ["--teacher", "x"]}
#: every command that takes --data, with what else it needs to reach its stage
DATA_COMMANDS = {**TRAINING, "eval": ["vla-micro-clip"], "train-detector": [], "precompute-regions": []}


def _reach_stage(monkeypatch, kind: str, args: list) -> dict:
    """Run `vla KIND ARGS` with the model check and the stage's `run` replaced by a recorder: what
    the stage would have been called with (its recipe and its positional inputs, `--out` last)."""
    from vla.stages import stage_run

    seen = {}

    def record(cfg, *inputs, force=False, command=None):
        seen.update(cfg=cfg, inputs=inputs)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "_check_models", lambda refs: None)
    monkeypatch.setattr(sys.modules[stage_run(kind).__module__], "run", record)
    r = runner.invoke(app, [kind, *args, "--recipe", str(shipped_recipe("smoke", kind))])
    assert seen, r.output
    return seen


def test_data_reaches_every_stage_as_the_string_typed(monkeypatch):
    """`--data 's3://b/{000..009}.tar'` is passed to every stage that takes data unchanged: no
    Path turns `s3://` into `s3:/`, and the braces are left for webdataset to expand."""
    for kind, extra in DATA_COMMANDS.items():
        seen = _reach_stage(monkeypatch, kind, [*extra, "--data", DATA, "--out", "/tmp/vla-never-written"])
        data = seen["inputs"][-2]  # the stage's inputs end with (data, out)
        assert data == DATA and isinstance(data, str), (kind, seen["inputs"])


#: what a stage opens before its data, stood in for so that `s3://...` is the first thing it reads
_BEFORE_DATA = {
    "stage2-roi": {"vla.stages.stage2_roi.open_artifact": lambda *a, **k: None},
    "train-teacher": {"vla.models.dclip.inputs.open_regions": lambda *a, **k: (_ART, None),
                      "vla.models.dclip.load_dclip_clip": lambda ref: (None, None, "clip"),
                      "vla.models.dclip.inputs.check_same_clip": lambda *a: None},
    "train-student": {"vla.stages.train_student.open_teacher": lambda *a: (_ART, 0),
                      "vla.models.dclip.inputs.open_regions": lambda *a, **k: (_ART, None),
                      "vla.models.dclip.load_dclip_clip": lambda ref: (_CLIP, None, "clip"),
                      "vla.models.dclip.inputs.check_same_clip": lambda *a: None,
                      "vla.models.dclip.vision_variants.apply_variant": lambda *a: None},
}


class _Art:
    """An upstream artifact as the DCLIP stages read it before the data: its CLIP and its regions."""
    path = Path("/tmp/vla-upstream")
    recipe = {"clip_identity": "clip"}
    manifest = {"inputs": {"clip": {"path": "c"}, "regions": {"path": "r"}}}


_ART = _Art()
_CLIP = type("Clip", (), {"model": type("M", (), {"visual": None})()})()


def test_data_reaches_the_reader_unchanged_from_every_training_command(monkeypatch, tmp_path):
    """`vla CMD --data 's3://b/{000..009}.tar'` runs CMD's real stage down to the data reader
    (`vla.data.stream.resolve_data`), which receives the string as typed, for every command whose
    data is image-text training data (eval's sets and train-detector's YOLO data have their own
    readers; `test_data_reaches_every_stage_as_the_string_typed` covers their CLI side)."""
    import vla.data.stream
    from vla.errors import UserError

    got = {}

    def reader(path):
        got[kind] = path
        raise UserError("the reader was reached")

    monkeypatch.setattr(cli, "_check_models", lambda refs: None)
    monkeypatch.setattr(vla.data.stream, "resolve_data", reader)
    for kind, extra in {**TRAINING, "precompute-regions": []}.items():
        for target, stand_in in _BEFORE_DATA.get(kind, {}).items():
            monkeypatch.setattr(target, stand_in)
        r = runner.invoke(app, [kind, *extra, "--data", DATA, "--out", str(tmp_path / kind),
                                "--recipe", str(shipped_recipe("smoke", kind))])
        assert "the reader was reached" in r.output and r.exit_code == 2, (kind, r.output)
        assert got[kind] == DATA and isinstance(got[kind], str), (kind, got[kind])


def test_training_data_hands_the_string_to_the_reader(monkeypatch):
    """Below the CLI, the stages' data entry (`training_data`) gives the reader the string as typed."""
    import vla.data.stream
    from vla.stages.common import training_data

    got = []

    def reader(path):
        got.append(path)
        raise SystemExit(0)

    monkeypatch.setattr(vla.data.stream, "resolve_data", reader)
    try:
        training_data(DATA)
    except SystemExit:
        pass
    assert got == [DATA]


def test_every_training_command_takes_the_shared_flags(monkeypatch):
    """--steps --batch-size --lr --precision --device on every command that trains with vla's loop,
    each landing in the recipe's `train:` block. train-teacher's length is its --epochs (a teacher
    is saved after each epoch), so it takes the other four."""
    for kind, extra in TRAINING.items():
        opts = {o for p in _click_commands()[kind].params for o in p.opts}
        flags = ["--batch-size", "3", "--lr", "0.25", "--precision", "bf16", "--device", "cpu"]
        if kind == "train-teacher":
            assert "--steps" not in opts and "--epochs" in opts
        else:
            flags += ["--steps", "7"]
        assert {f for f in flags if f.startswith("--")} <= opts, kind
        train = _reach_stage(monkeypatch, kind, [*extra, "--data", "d", "--out", "/tmp/o", *flags])["cfg"].train
        assert (train.batch_size, train.lr, train.precision, train.device) == (3, 0.25, "bf16", "cpu"), kind
        assert kind == "train-teacher" or train.steps == 7, kind


def test_every_recipe_kind_has_a_command():
    """A recipe's `kind:` is the name of the command that runs it."""
    from vla.stages import RECIPES

    assert set(RECIPES) <= set(_click_commands())


def test_options_become_recipe_overrides():
    """The one mapping from a command's options to recipe keys: training flags under `train.` when
    the recipe has a loop, renamed keys, enums by value; unset options and the stage's own inputs
    are left out."""
    from vla.stages.distill import DistillRecipe
    from vla.stages.train_detector import TrainDetectorRecipe

    got = cli.recipe_overrides(DistillRecipe, {"data": "d", "out": "o", "embedder": "minilm", "pooling": None,
                                               "steps": 5, "precision": cli.Precision.bf16, "recipe": None})
    assert got == {"embedder.name": "minilm", "train.steps": 5, "train.precision": "bf16"}
    assert cli.recipe_overrides(TrainDetectorRecipe, {"device": "cpu", "batch": 8}) == {"device": "cpu", "batch": 8}
