"""The ProCLIP curriculum end to end on tiny settings, through the Makefile and the CLI exactly as
a user runs `make proclip` (recipes/smoke/), then the export checked against its source."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proclip")
    make_vars = [f"WORLD={tmp}/world", f"RUNS={tmp}/runs", f"EXPORT={tmp}/export", "RECIPES=recipes/smoke",
                 "SYNTH_RECIPE=recipes/smoke/synth.yaml"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1", "VLA_CACHE_DIR": str(tmp / "cache")}
    first = subprocess.run(["make", "proclip", *make_vars], cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(["make", "proclip", *make_vars], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=120)
    return tmp, first, second


def manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def test_curriculum_runs_and_prints_the_comparison(curriculum):
    tmp, first, _ = curriculum
    assert "ProCLIP curriculum" in first.stdout
    table = (tmp / "runs" / "eval" / "results.md").read_text()
    for name in ("clip", "llm2clip", "contrast"):
        assert name in table
    assert table.strip() in first.stdout  # the table printed is the eval artifact's


def test_second_make_does_nothing(curriculum):
    _, _, second = curriculum
    assert second.returncode == 0
    for stage in ("vla synth", "vla pretrain", "vla distill", "vla contrast-tune", "vla eval", "vla export"):
        assert stage not in second.stdout


def test_artifacts_chain_by_manifest(curriculum):
    tmp, _, _ = curriculum
    runs = tmp / "runs"
    world, clip, distill = manifest(tmp / "world"), manifest(runs / "clip"), manifest(runs / "distill")
    contrast, baseline, ev = manifest(runs / "contrast"), manifest(runs / "llm2clip"), manifest(runs / "eval")
    export = manifest(tmp / "export")
    assert clip["inputs"]["data"]["digest"] == world["digest"]
    assert distill["inputs"]["teacher"]["digest"] == clip["digest"]
    assert contrast["inputs"]["init"]["digest"] == distill["digest"]
    assert contrast["inputs"]["init"]["inputs"]["teacher"]["digest"] == clip["digest"]  # lineage is nested
    assert baseline["recipe"]["init"] == "random" and "init" not in baseline["inputs"]
    assert baseline["inputs"]["clip"]["digest"] == clip["digest"]
    assert {r["digest"] for k, r in ev["inputs"].items() if k.startswith("model")} == {
        clip["digest"], baseline["digest"], contrast["digest"]}
    assert export["inputs"]["model"]["digest"] == contrast["digest"]
    # truncation is counted: by the teacher (16 tokens) and the embedder, for each text variant
    # distill encoded (the short caption and a second short caption) and each contrast-tune drew from
    assert distill["counts"]["teacher_truncated"] == {"context_length": 16, "short": 0, "second": 0}
    assert distill["counts"]["embedder_truncated"] == {"max_length": 128, "short": 0, "second": 0}
    assert contrast["counts"]["embedder_truncated"] == {"max_length": 128, "captions": 0, "long_captions": 0}
    for m in (clip, contrast, baseline):
        assert set(m["metrics"]["eval"]) == {"retrieval", "long_retrieval", "zeroshot"}


def test_every_caption_that_can_be_drawn_is_encoded_once(curriculum):
    """contrast-tune draws a sample's caption anew each epoch, so Φ of each of its captions and of
    its long caption is cached: one entry per caption column, shared by distill (first and second
    caption), ProCLIP and the baseline."""
    tmp, _, _ = curriculum
    from vla.cache import FeatureTable

    entries = {}
    for p in (tmp / "cache" / "features").glob("*/meta.json"):
        entries.setdefault(json.loads(p.read_text())["name"], []).append(FeatureTable(p.parent))
    assert not list((tmp / "world").rglob("*.npy"))  # nothing is written into the data directory
    phi = {k: v for k, v in entries.items() if k.startswith("phi.")}
    assert sorted(phi) == ["phi.caption", "phi.caption2", "phi.caption3", "phi.caption4", "phi.caption5",
                           "phi.long_caption"]
    assert all(len(v) == 1 for v in phi.values())  # computed once, then cache hits
    assert {len(v[0]) for v in phi.values()} == {manifest(tmp / "runs" / "distill")["counts"]["captions"]}


def test_export_loads_with_vla_and_open_clip_alike(curriculum):
    import open_clip

    import vla
    from vla.evaluate.evalsets import load_eval_set
    from vla.models.load import load_encoder

    tmp, _, _ = curriculum
    images = list(load_eval_set(tmp / "world" / "eval" / "retrieval").images[:4])
    texts = ["a red circle", "a long caption " * 30]
    exported = vla.load(tmp / "export")
    source = load_encoder(str(tmp / "runs" / "contrast"))
    assert torch.allclose(exported.encode_image(images), source.encode_image(images), atol=1e-6)
    assert torch.allclose(exported.encode_text(texts), source.encode_text(texts), atol=1e-6)
    # open_clip alone loads the exported image tower and gives the same image embeddings
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp / 'export'}")
    model.eval()
    with torch.no_grad():
        feats = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    assert torch.allclose(feats, exported.encode_image(images), atol=1e-5)
    assert "## Lineage" in (tmp / "export" / "README.md").read_text()


def test_export_card_and_files_as_a_user_shares_them(curriculum):
    """The model card warns that open_clip gets only the image tower right, carries a Hugging
    Face metadata header, use, data and metrics, and its snippets hold no machine's paths; the
    files are readable by others (0644), as any downloaded model's are."""
    import re

    tmp = curriculum[0]
    export = tmp / "export"
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vla\n") and "\npipeline_tag:" in card.split("\n---\n")[0]
    assert "**⚠ Only the image tower is meant for open_clip.**" in card
    assert "cuts every text at 16 tokens" in card  # the smoke CLIP's own text context
    for section in ("## Use", "## Intended use", "## Training data", "## Evaluation", "## Upload"):
        assert section in card, section
    assert "synthetic world" in card.split("## Training data")[1]
    assert re.search(r"\| retrieval \| \d+\.\d \|", card)  # metrics ×100 from the source's eval
    snippets = "".join(re.findall(r"```python\n(.*?)```", card, flags=re.S))
    assert 'vla.load("export")' in snippets and str(tmp) not in snippets and "upload_folder" in snippets
    for f in export.iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o644, f


def test_loaded_export_takes_one_item_and_says_what_it_is(curriculum):
    import vla
    from PIL import Image

    model = vla.load(curriculum[0] / "export")
    text = repr(model)
    for part in ("ProCLIPModel", "embed_dim=", "embedder minilm", "mean pooling", "adapter (1 block ×8",
                 "lineage:", "export ", "model: contrast-tune", "init: distill"):
        assert part in text, (part, text)
    one = model.encode_text("a red circle")
    assert one.shape == (1, model.embed_dim)
    assert torch.allclose(one, model.encode_text(["a red circle", "a blue square"])[:1], atol=1e-6)
    image = Image.new("RGB", (64, 64), (10, 200, 10))
    assert model.encode_image(image).shape == (1, model.embed_dim)
    assert "(N, D)" in type(model).encode_text.__doc__ and "(N, D)" in vla.load.__doc__


def test_stages_run_under_torchrun(curriculum, tmp_path):
    """`torchrun --nproc-per-node 2 -m vla STAGE` (gloo on the CPU): one artifact, written by rank 0,
    counting both ranks' samples; the contrastive losses gather features across ranks; rank 0 alone
    reports (each rank's output read from its own log file, never the shared stdout)."""
    world, runs = curriculum[0] / "world", curriculum[0] / "runs"
    logs = tmp_path / "logs"
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                "--redirects", "3", "--log-dir", str(logs), "-m", "vla"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    stages = {
        # before the fix, ranks other than 0 crashed reading the manifest of the artifact they
        # do not write (cli.py), after training
        "distill": ["distill", "--data", str(world), "--teacher", str(runs / "clip"), "--embedder", "minilm",
                    "--recipe", "recipes/smoke/proclip/distill.yaml"],
        "pretrain": ["pretrain", "--data", str(world), "--recipe", "recipes/smoke/pretrain.yaml"],
        "contrast": ["contrast-tune", "--data", str(world), "--init", str(runs / "distill"),
                     "--recipe", "recipes/smoke/proclip/contrast-tune.yaml"],
    }
    for name, args in stages.items():
        out = tmp_path / name
        sets = ["--set", "train.batch_size=16", "--set", "train.steps=4", "--set", "train.device=cpu"]
        if name != "distill":
            sets += ["--set", "eval.sets=[retrieval]"]
        proc = subprocess.run([*torchrun, *args, "--out", str(out), *sets], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        rank_out = [_rank_log(logs, r, "stdout") for r in range(2)]
        assert proc.returncode == 0, rank_out[0][-2000:] + _rank_log(logs, 0, "stderr")[-3000:]
        m = manifest(out)
        if name == "distill":  # 16 rows a step over both ranks
            assert m["metrics"]["val"]["rows"] > 0 and m["resumed"] is False
            assert "teacher truncated" in rank_out[0] and rank_out[0].count("✓ distill") == 1
            assert "✓" not in rank_out[1]
        else:
            assert m["counts"]["train"]["steps"] == 4
            assert m["counts"]["train"]["samples"] == 4 * 16 * 2  # both ranks' batches
            assert "retrieval" in m["metrics"]["eval"]
        assert sorted(p.name for p in tmp_path.iterdir() if name in p.name) == [name]  # no partial left
        shutil.rmtree(logs)
        check = subprocess.run([sys.executable, "-m", "vla", "inspect", str(out), "--verify"], cwd=ROOT,
                               env=env, capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr


def _rank_log(logs: Path, rank: int, stream: str) -> str:
    """What rank `rank` wrote to `stream`, from torchrun's per-rank files (`--redirects 3 --log-dir`)."""
    (path,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def test_distill_batch_larger_than_the_data_is_a_user_error(curriculum, tmp_path):
    """Before, `row_batches` divided by zero when there were fewer training rows than the batch."""
    world, runs = curriculum[0] / "world", curriculum[0] / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vla", "distill", "--data", str(world),
                           "--teacher", str(runs / "clip"), "--embedder", "minilm", "--recipe", "recipes/smoke/proclip/distill.yaml",
                           "--set", "train.batch_size=100000", "--out", str(tmp_path / "d")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "train.batch_size 100000 is more than the 224 training rows" in proc.stderr
