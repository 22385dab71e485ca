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
