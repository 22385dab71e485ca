"""The evaluation report: files, numbers in the markdown, NaN in JSON, the figures."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from PIL import Image, ImageColor, ImageDraw

from vla.evaluate.evalsets import EvalSet
from vla.evaluate.report import results_markdown, write_report

RETRIEVAL = {"image_retrieval_recall@1": 0.412, "text_retrieval_recall@1": 0.55,
             "image_retrieval_recall@5": 0.7, "text_retrieval_recall@5": 0.8,
             "mean_recall": 0.6234, "text_truncated_fraction": 0.0, "context_length": 16,
             "n_images": 100, "n_texts": 500}
RESULTS = {
    "clip-small": {
        "world-short": RETRIEVAL,
        "world-long": {**RETRIEVAL, "mean_recall": 0.21, "text_truncated_fraction": 1.0},
        "world-classes": {"acc1": 0.875, "acc5": float("nan"), "mean_per_class_recall": 0.8,
                          "n_images": 40, "n_classes": 4},
    },
    "proclip": {
        "world-short": {**RETRIEVAL, "mean_recall": 0.7},
        "world-long": {**RETRIEVAL, "mean_recall": 0.66, "context_length": None},
        "world-classes": {"acc1": 0.9, "acc5": float("nan"), "mean_per_class_recall": 0.85,
                          "n_images": 40, "n_classes": 4},
        "world-captions": {"bleu4": 0.253, "cider_d": 0.912, "n_images": 40},
    },
}

COLOURS = ["red", "green", "blue", "orange", "purple", "gray", "gold", "teal"]


def shape_images() -> list[Image.Image]:
    images = []
    for i, colour in enumerate(COLOURS):
        im = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(im)
        (draw.ellipse if i % 2 else draw.rectangle)((12, 12, 52, 52), fill=colour)
        images.append(im)
    return images


def test_markdown_has_the_key_numbers_and_marks_the_best():
    md = results_markdown(RESULTS)
    header = md.splitlines()[4]
    assert "world-short mR" in header and "world-classes acc1" in header
    assert "world-captions CIDEr-D" in header
    row = next(line for line in md.splitlines() if line.startswith("| clip-small"))
    # fractions ×100, one decimal; the better model's number (and ties for best) in bold
    assert "| 62.3 | **41.2** | **55.0** | 21.0 |" in row and "| 87.5 |" in row
    assert "**70.0**" in md and "**91.2**" in md  # proclip's mR and CIDEr-D ×100
    assert "- clip-small on world-long: 100.0% of texts are longer than its 16-token" in md
    assert "clip-small on world-short" not in md  # nothing truncated there
    # per-set detail tables show truncation and an unlimited context as "none"
    assert "## world-long" in md and "| 100.0 |" in md and "| none |" in md
    assert "| – |" in md  # acc5 is NaN with 4 classes


class MeanColourModel:
    """Images → mean RGB, texts → the RGB of the colour they name: right often, not always."""
    text_context_length = None

    def __init__(self, name: str, noise: float = 0.0):
        self.name, self.noise = name, noise
        self.gen = torch.Generator().manual_seed(0)

    def encode_image(self, images):
        rgb = torch.tensor([im.resize((1, 1), Image.BOX).getpixel((0, 0)) for im in images],
                           dtype=torch.float32)
        noise = self.noise * 255 * torch.rand(rgb.shape, generator=self.gen)
        return F.normalize(rgb + noise, dim=-1)

    def encode_text(self, texts):
        rgb = [ImageColor.getrgb(next(c for c in COLOURS if c in t)) for t in texts]
        return F.normalize(torch.tensor(rgb, dtype=torch.float32) + 1.0, dim=-1)

    def text_token_counts(self, texts):
        return [len(t.split()) for t in texts]


def test_write_report_files(tmp_path):
    images = shape_images()
    captions = [[f"a {c} {'circle' if i % 2 else 'square'}"] for i, c in enumerate(COLOURS)]
    es = EvalSet(name="world-short", task="retrieval", path=tmp_path, images=images,
                 captions=captions)
    models = {"clip-small": MeanColourModel("clip-small", noise=2.0),
              "proclip": MeanColourModel("proclip")}
    files = write_report(RESULTS, tmp_path / "report", sets=[es], models=models, examples=3)
    assert set(files) == {"results.json", "results.md", "comparison.png",
                          "retrieval_examples.png"}
    for path in files.values():
        assert path.stat().st_size > 0
    data = json.loads(files["results.json"].read_text())  # strict JSON: no NaN
    assert data["clip-small"]["world-classes"]["acc5"] is None
    assert data["proclip"]["world-short"]["mean_recall"] == 0.7
    with Image.open(files["comparison.png"]) as im:
        assert im.width > 600 and im.height > 400
    with Image.open(files["retrieval_examples.png"]) as im:
        assert im.height > 6 * 150  # 3 queries × 2 models


def test_no_examples_figure_without_a_retrieval_set(tmp_path):
    files = write_report(RESULTS, tmp_path, sets=[], models={"proclip": MeanColourModel("p")})
    assert "retrieval_examples.png" not in files
    assert not (tmp_path / "retrieval_examples.png").exists()


def test_examples_figure_shows_short_and_long_caption_queries(tmp_path):
    images = shape_images()
    short = EvalSet(name="short", task="retrieval", path=tmp_path, images=images,
                    captions=[[f"a {c} shape"] for c in COLOURS])
    long = EvalSet(name="long", task="long_retrieval", path=tmp_path, images=images[:5],
                   captions=[[f"a long caption that goes on and on about a {c} shape " * 4]
                             for c in COLOURS[:5]])
    files = write_report(RESULTS, tmp_path / "r", sets=[short, long],
                         models={"m": MeanColourModel("m")}, examples=4)
    with Image.open(files["retrieval_examples.png"]) as im:
        assert im.height > 4 * 200  # 2 short + 2 long queries, one model


def test_chart_gives_each_metric_its_own_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    limits = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: limits.extend(
        ax.get_ylim()[1] for ax in fig.axes if ax.get_title()))
    from vla.evaluate.report import write_comparison_chart
    write_comparison_chart({"a": {"s": {"mean_recall": 0.6, "image_retrieval_recall@1": 0.04,
                                        "text_retrieval_recall@1": 0.02}}}, tmp_path / "c.png")
    # R@1 of 4 and 2 are drawn on their own small axes, not under a 0–110 one
    assert len(limits) == 3 and max(limits) > 60 and min(limits) < 6


def test_eval_merge_joins_runs_and_clip_benchmark_files(tmp_path):
    from typer.testing import CliRunner

    from vla.cli import app
    from vla.evaluate.report import write_clip_benchmark_results

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    write_report({"clip-small": RESULTS["clip-small"]}, run_a)
    write_report({"proclip": RESULTS["proclip"]}, run_b)
    cb = tmp_path / "cb"
    cb.mkdir()
    (cb / "x.json").write_text(json.dumps({
        "dataset": "wds/world-short", "model": "ViT-B-32", "pretrained": "openai",
        "task": "zeroshot_retrieval", "metrics": {"image_retrieval_recall@1": 0.5}}))
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["eval-merge", str(run_a), str(run_b), str(cb / "x.json"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    merged = json.loads((out / "results.json").read_text())
    assert list(merged) == ["clip-small", "proclip", "ViT-B-32 openai"]
    assert merged["proclip"]["world-short"]["mean_recall"] == 0.7
    csv_rows = (out / "benchmark.csv").read_text().splitlines()
    assert csv_rows[0].startswith("dataset,model,") and len(csv_rows) == 1 + 3 + 4 + 1
    md = (out / "results.md").read_text()
    assert "| ViT-B-32 openai |" in md and "| proclip |" in md
    # vla's own CLIP_benchmark-layout files merge back to the same numbers
    files = write_clip_benchmark_results(RESULTS, tmp_path / "cbvla", refs={"proclip": "runs/x"})
    assert "world-short_x_proclip_en_zeroshot_retrieval.json" in {f.name for f in files}
    again = CliRunner().invoke(app, ["eval-merge", str(tmp_path / "cbvla"), "--out",
                                     str(tmp_path / "m2")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "m2" / "results.json").read_text())["proclip"]["world-long"][
        "mean_recall"] == 0.66
    bad = CliRunner().invoke(app, ["eval-merge", str(tmp_path / "nowhere"), "--out", str(out)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
