import json

import pytest

from vla.artifacts import ArtifactBuilder, FORMAT_VERSION, open_artifact, partial_dir, verify
from vla.errors import UserError


def build(out, kind="pretrain", recipe=None, **kw):
    with ArtifactBuilder(out, kind, recipe=recipe or {"lr": 1.0}, command=["vla", "test"], **kw) as art:
        (art.dir / "weights.bin").write_bytes(b"abc")
        art.counts["samples"] = 3
        art.metrics["loss"] = 0.5
    return art.artifact


def test_manifest_records_the_contract(tmp_path):
    data = build(tmp_path / "data", kind="synth")
    art = build(tmp_path / "run", inputs={"data": data})
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["format"] == "vla-artifact" and m["format_version"] == FORMAT_VERSION
    assert m["kind"] == "pretrain" and m["recipe"] == {"lr": 1.0} and m["command"] == ["vla", "test"]
    assert m["outputs"] == {"weights.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert m["inputs"]["data"]["kind"] == "synth" and m["inputs"]["data"]["digest"] == data.digest
    assert m["counts"] == {"samples": 3} and m["metrics"] == {"loss": 0.5}
    assert "wall_s" in m["timings"] and "vla_version" in m and "git_commit" in m
    assert art.kind == "pretrain" and not partial_dir(tmp_path / "run").exists()


def test_wall_time_counts_from_the_stage_start_not_the_artifact_open(tmp_path):
    """`timings.wall_s` includes what a stage did before opening its artifact (model loading,
    the feature cache), `setup_s` is that share, and the clock is spent by the artifact that
    took it: the next one starts its own."""
    import time

    from vla.artifacts import start_stage_clock

    start_stage_clock()
    time.sleep(0.3)
    first = json.loads((build(tmp_path / "a").path / "manifest.json").read_text())["timings"]
    second = json.loads((build(tmp_path / "b").path / "manifest.json").read_text())["timings"]
    assert first["setup_s"] >= 0.3 and first["wall_s"] >= first["setup_s"]
    assert second["setup_s"] == 0.0 and second["wall_s"] < 0.3


def test_crash_leaves_no_finished_looking_artifact_and_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with ArtifactBuilder(out, "pretrain", recipe={"lr": 1.0}) as art:
            (art.dir / "checkpoints").mkdir()
            (art.dir / "checkpoints" / "last.pt").write_bytes(b"state")
            raise RuntimeError("killed mid-stage")
    assert not out.exists()
    with pytest.raises(UserError, match="unfinished"):
        open_artifact(out, "pretrain")
    with ArtifactBuilder(out, "pretrain", recipe={"lr": 1.0}) as art:
        assert art.resumed
        assert (art.dir / "checkpoints" / "last.pt").read_bytes() == b"state"
    assert open_artifact(out, "pretrain").manifest["resumed"] is True
    assert not (out / "checkpoints").exists()  # resume state is dropped once finished


def test_resuming_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with ArtifactBuilder(out, "pretrain", recipe={"train": {"lr": 1.0}}):
            raise RuntimeError
    with pytest.raises(UserError, match=r"train\.lr: 1\.0 → 2\.0.*--force"):
        with ArtifactBuilder(out, "pretrain", recipe={"train": {"lr": 2.0}}):
            pass
    with ArtifactBuilder(out, "pretrain", recipe={"train": {"lr": 2.0}}, force=True) as art:
        assert not art.resumed


def test_wrong_kind_and_future_version_refused(tmp_path):
    build(tmp_path / "run", kind="eval")
    with pytest.raises(UserError, match=r"run is a 'eval' artifact; --init expects 'distill'"):
        open_artifact(tmp_path / "run", "distill", role="--init")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=f"format version {FORMAT_VERSION + 1}.*upgrade vla"):
        open_artifact(tmp_path / "run", "eval")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a vla artifact"):
        open_artifact(tmp_path / "plain")
    with pytest.raises(UserError, match="does not exist"):
        open_artifact(tmp_path / "nothing", "distill")


def test_finished_artifact_not_overwritten_without_force(tmp_path):
    build(tmp_path / "run")
    with pytest.raises(UserError, match="already a finished 'pretrain' artifact; pass --force"):
        build(tmp_path / "run")
    before = open_artifact(tmp_path / "run").manifest["created"]
    art = build(tmp_path / "run", recipe={"lr": 3.0}, force=True)
    assert art.recipe == {"lr": 3.0} and before
    assert not list(tmp_path.glob(".run.*"))  # no partial or trash left behind


def test_verify_detects_changed_and_missing_outputs(tmp_path):
    art = build(tmp_path / "run")
    assert verify(art) == []
    (tmp_path / "run" / "weights.bin").write_bytes(b"abd")
    assert verify(art) == ["changed: weights.bin"]
    (tmp_path / "run" / "weights.bin").unlink()
    assert verify(art) == ["missing: weights.bin"]
