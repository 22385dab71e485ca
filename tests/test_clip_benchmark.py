"""`vla eval` against CLIP_benchmark itself (the pip package `clip-benchmark`, installed --no-deps
by `make install`), on the same tiny model and the same synthetic-world eval sets, ties included.

CLIP_benchmark runs through its own CLI entry point (`clip_benchmark.cli.main`), on the world's
eval directories unmodified, loading the model with open_clip's `local-dir:` schema. One change
to it, made inside this test only: CLIP_benchmark 1.6.2's zero-shot `accuracy` converts a
1-element array with `float(...)`, which numpy >= 2.4 refuses; the patched copy below differs
from it in that one expression (`.item()`), nothing else.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import clip_benchmark.cli as cb_cli  # noqa: E402  (make install puts it there)
from clip_benchmark.metrics import zeroshot_classification  # noqa: E402

from vla.cli import app  # noqa: E402
from vla.data.synth import SynthConfig, generate_world  # noqa: E402
from vla.models.clip import load_clip, save_clip  # noqa: E402

SETS = ("retrieval", "long_retrieval", "zeroshot", "regional", "captioning")
TASK = {"zeroshot": "zeroshot_classification"}  # every other set is retrieval to CLIP_benchmark


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy`, with `float(x.numpy())` → `x.item()` (numpy >= 2.4)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().item()) / n
            for k in topk]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    world = root / "world"
    world.mkdir()
    # 3 shards per set (0.tar, 1.tar, 2.tar): the shard order must be CLIP_benchmark's too
    generate_world(world, SynthConfig(n_train=0, n_val=0, n_test=60, shard_size=25, workers=1,
                                      yolo_train=0))
    model = save_clip(load_clip("vla-micro-clip"), root / "micro")
    result = CliRunner().invoke(app, ["eval", str(model), "--data", str(world / "eval"),
                                      "--out", str(root / "eval"), "--sets", ",".join(SETS),
                                      "--set", "batch_size=16"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["eval", str(model), "--data", str(world / "eval"),
                                      "--out", str(root / "pessimistic"), "--sets",
                                      "long_retrieval", "--mode", "pessimistic"])
    assert result.exit_code == 0, result.output
    return root, world, model


def clip_benchmark_eval(monkeypatch, tmp_path, world: Path, model: Path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    monkeypatch.setattr(sys, "argv", [
        "clip_benchmark", "eval", "--dataset", f"wds/{name}", "--dataset_root",
        str(world / "eval" / name), "--task", TASK.get(name, "zeroshot_retrieval"),
        "--model", f"local-dir:{model}", "--pretrained", "none", "--no_amp",
        "--batch_size", "16", "--num_workers", "0", "--recall_k", "1", "5", "10",
        "--output", str(out)])
    cb_cli.main()
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", SETS)
def test_vla_eval_equals_clip_benchmark(setup, monkeypatch, tmp_path, name):
    root, world, model = setup
    theirs = clip_benchmark_eval(monkeypatch, tmp_path, world, model, name)["metrics"]
    assert theirs, name
    if name in ("regional", "captioning"):
        # CLIP_benchmark reads them as plain retrieval (whole images against region captions /
        # captioning references): it runs, but measures another task than vla's region crops
        # and caption generation, so there is nothing to compare
        return
    ours = next(iter(json.loads((root / "eval" / "results.json").read_text()).values()))[name]
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6, nan_ok=True), (name, key)
    if name == "long_retrieval":
        # the micro CLIP cuts long captions to the same first tokens, so images see exact ties
        # among captions: the equality above holds through them
        assert ours["text_retrieval_ties"] > 0
        low = next(iter(json.loads((root / "pessimistic" / "results.json").read_text())
                        .values()))[name]
        assert low["mean_recall"] < ours["mean_recall"]  # the ties do change the numbers


def test_metrics_equal_clip_benchmark_functions_with_exact_ties():
    """CLIP_benchmark's own `recall_at_k`/`batchify` and `accuracy`/`balanced_accuracy_score` on
    embeddings full of exact ties (every image and caption has a bit-identical twin, every class
    a twin class), against vla's default mode on the same embeddings."""
    import torch
    import torch.nn.functional as F
    from clip_benchmark.metrics import zeroshot_retrieval as zr
    from sklearn.metrics import balanced_accuracy_score

    from vla.evaluate.retrieval import retrieval_metrics
    from vla.evaluate.zeroshot import zeroshot_metrics

    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(40, 16, generator=gen), dim=-1)
    images[20:] = images[:20]
    owner = torch.arange(120) % 40
    texts = F.normalize(images[owner] + 0.4 * torch.randn(120, 16, generator=gen), dim=-1)
    texts[60:] = texts[:60]
    ours = retrieval_metrics(images, texts, owner)
    assert ours["image_retrieval_ties"] > 0 and ours["text_retrieval_ties"] > 0
    scores = texts @ images.t()
    positive = torch.zeros_like(scores, dtype=bool)
    positive[torch.arange(len(scores)), owner] = True
    for k in (1, 5, 10):
        t2i = (zr.batchify(zr.recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean()
        i2t = (zr.batchify(zr.recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean()
        assert ours[f"image_retrieval_recall@{k}"] == pytest.approx(t2i.item(), abs=1e-6)
        assert ours[f"text_retrieval_recall@{k}"] == pytest.approx(i2t.item(), abs=1e-6)

    classes = F.normalize(torch.randn(6, 16, generator=gen), dim=-1).repeat(2, 1)  # twin classes
    labels = torch.arange(40) % 12
    ours = zeroshot_metrics(images, labels, classes)
    assert ours["ties"] == 40
    logits = 100.0 * images @ classes.T.contiguous()
    acc1, acc5 = _accuracy(logits, labels, topk=(1, 5))
    assert (ours["acc1"], ours["acc5"]) == pytest.approx((acc1, acc5), abs=1e-6)
    assert ours["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(axis=1)), abs=1e-6)


def test_vla_writes_clip_benchmark_result_files(setup):
    root, _, _ = setup
    files = sorted((root / "eval" / "clip_benchmark").glob("*.json"))
    # captioning: the micro CLIP does not generate, so vla has no result for it
    assert [f.name for f in files] == sorted(
        f"{name}_micro_micro_en_{TASK.get(name, 'zeroshot_retrieval')}.json" for name in SETS
        if name != "captioning")
    dump = json.loads(files[0].read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(dump)


def test_clip_benchmark_cli_runs_unmodified_on_a_world_set(setup, tmp_path):
    """The real console entry, in a fresh process, with nothing patched (retrieval only:
    zero-shot needs the numpy fix above)."""
    root, world, model = setup
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "eval", "--dataset",
                    "wds/retrieval", "--dataset_root", str(world / "eval" / "retrieval"),
                    "--task", "zeroshot_retrieval", "--model", f"local-dir:{model}",
                    "--pretrained", "none", "--no_amp", "--num_workers", "0",
                    "--output", str(out)], check=True, capture_output=True, timeout=300)
    theirs = json.loads(out.read_text())["metrics"]
    ours = next(iter(json.loads((root / "eval" / "results.json").read_text()).values()))["retrieval"]
    assert theirs["image_retrieval_recall@5"] == pytest.approx(ours["image_retrieval_recall@5"],
                                                               abs=1e-6)
