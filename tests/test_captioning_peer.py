"""vla's BLEU-4 and CIDEr-D against pycocoevalcap's own pipeline: its Java `PTBTokenizer`, then
`Bleu(4)` and `Cider` (CIDEr-D: clipped n-gram weights and the length penalty).

- the scorers alone, on text both sides tokenise with vla's `ptb_tokenize`;
- `vla eval` end to end against `PTBTokenizer().tokenize` + `Bleu(4)` + `Cider` on captions with
  brackets, numbers, times, abbreviations and contractions (needs java: skipped without it);
- the pure-Python `ptb_tokenize` against the Java tokenizer on those captions, and its stated
  difference.
"""

from __future__ import annotations

import io
import json
import random
import tarfile

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vla.evaluate.captioning import (bleu, captioning_metrics, cider_d, java_ptb_tokenize, java_tokenizer,
                                     ptb_tokenize)

needs_java = pytest.mark.skipif(java_tokenizer() is None, reason="java or pycocoevalcap's jar is missing")

WORDS = "a the red blue small large circle square star on in left right of and is".split()


def _cases():
    rng = random.Random(0)
    cases = [  # hand-picked: exact match, a short candidate, repeated words, one-word captions
        (["a red circle on the left"], [["a red circle on the left", "the red circle"]]),
        (["the cat"], [["the cat sat on the mat", "a cat is on a mat"]]),
        (["a a a a"], [["a cat", "a dog"]]),
        (["star", "a blue square"], [["star"], ["a small blue square in the middle"]]),
    ]
    for _ in range(4):  # random corpora of 6 images, 1–5 references each
        n = 6
        cands = [" ".join(rng.choices(WORDS, k=rng.randint(2, 9))) for _ in range(n)]
        refs = [[" ".join(rng.choices(WORDS, k=rng.randint(2, 11)))
                 for _ in range(rng.randint(1, 5))] for _ in range(n)]
        cases.append((cands, refs))
    return cases


@pytest.mark.parametrize(("candidates", "references"), _cases())
def test_bleu4_and_cider_d_equal_pycocoevalcap(candidates, references):
    tok = lambda text: " ".join(ptb_tokenize(text))  # noqa: E731
    res = {i: [tok(c)] for i, c in enumerate(candidates)}
    gts = {i: [tok(r) for r in refs] for i, refs in enumerate(references)}
    bleu4 = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    assert bleu(candidates, references, tokenizer="python") == pytest.approx(bleu4, rel=1e-9, abs=1e-12)
    if len(candidates) > 1:  # CIDEr's document frequencies need a corpus (log 1 = 0 for one image)
        assert cider_d(candidates, references, tokenizer="python") == pytest.approx(Cider().compute_score(gts, res)[0],
                                                                rel=1e-9, abs=1e-12)


# --- the whole pipeline, Java tokenizer included ---------------------------------------------------

TRICKY = [  # (candidate, references): brackets, times, thousands, abbreviations, contractions
    ("A dog (a big one) at 3:30.", ["a dog -- a big one -- at 3:30", "The dog (big) sits at 3:30 p.m."]),
    ("1,000 people in the U.S. cannot see it!", ["1,000 people in the u.s. can not see", "people (1,000) can't see"]),
    ("they're gonna go, wanna see?", ["They are going to go; want to see?", "they 're gon na go"]),
    ("A man's hat; don't touch [it].", ["a man's hat", "don't touch the man's {hat}"]),
    ('"Quoted" text -- here... 3.5 inch co-op', ["quoted text here", "a 3.5-inch co-op, quoted"]),
    ("It's 5 p.m., e.g. Mr. Smith's dog", ["at 5 p.m. mr. smith's dog", "it is 5pm: smith's dog"]),
    ("can't won't isn't 'tis gotta lemme", ["can not will not", "it is not 'tis"]),
    ("a b&w photo @ 10% $5 #1 (2007-08)", ["a b&w photo of 10%", "a photo, $5 (#1)"]),
]


def _pycocoevalcap(candidates, references):
    """pycocoevalcap's own pipeline: PTBTokenizer (Java), Bleu(4), Cider."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    res = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(candidates)})
    gts = tok.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    return Bleu(4).compute_score(gts, res, verbose=0)[0][3], Cider().compute_score(gts, res)[0]


def _write_captioning_set(root, images, references):
    """A CLIP_benchmark-layout captioning set: test/0.tar with key.png and key.txt."""
    (root / "test").mkdir(parents=True)
    (root / "info.json").write_text(json.dumps({"task": "captioning", "name": root.name}))
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("1\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, (image, refs) in enumerate(zip(images, references)):
            png = io.BytesIO()
            image.save(png, format="PNG")
            for name, data in ((f"{i:04d}.png", png.getvalue()), (f"{i:04d}.txt", "\n".join(refs).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@needs_java
def test_vla_eval_bleu4_and_cider_d_equal_pycocoevalcaps_pipeline_with_its_java_tokenizer(tmp_path, monkeypatch):
    """`vla eval` of an MM-GEM artifact on a captioning set whose captions are tricky for a
    tokenizer: its BLEU-4 and CIDEr-D are pycocoevalcap's (PTBTokenizer + Bleu + Cider) on the
    captions it wrote and the set's references, and the manifest names the Java tokenizer."""
    from PIL import Image
    from typer.testing import CliRunner

    from vla.cli import app
    from vla.models.mmgem import MMGEM

    runner = CliRunner()

    def cli(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output

    cli("synth", "--out", tmp_path / "world", "--recipe", "recipes/smoke/synth.yaml", "--set", "n_train=16",
        "--set", "n_val=8", "--set", "n_test=12", "--set", "shard_size=16")
    cli("joint-train", "--data", tmp_path / "world", "--out", tmp_path / "joint", "--recipe",
        "recipes/smoke/mmgem/joint-train.yaml", "--set", "train.steps=1", "--set", "eval.sets=[]")
    images = [Image.new("RGB", (40 + i, 30), (30 * i, 80, 200 - 20 * i)) for i in range(len(TRICKY))]
    _write_captioning_set(tmp_path / "sets" / "tricky", images, [refs for _, refs in TRICKY])
    # the candidates are the tricky captions themselves: what decoding writes is not under test here
    by_size = {im.size: cand for im, (cand, _) in zip(images, TRICKY)}
    monkeypatch.setattr(MMGEM, "caption", lambda self, ims, boxes=None, **kw: [by_size[im.size] for im in ims])
    cli("eval", tmp_path / "joint", "--data", tmp_path / "sets", "--out", tmp_path / "eval",
        "--set", "sets=[tricky]", "--set", "examples=0")
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["captioning_tokenizer"] == "java"
    (metrics,) = [m["tricky"] for m in manifest["metrics"].values()]
    written = [json.loads(line) for line in next((tmp_path / "eval" / "captions").rglob("tricky.jsonl")).open()]
    assert [w["caption"] for w in written] == [c for c, _ in TRICKY]
    bleu4, cider = _pycocoevalcap([w["caption"] for w in written], [w["references"] for w in written])
    assert 0.05 < bleu4 < 0.95 and cider > 0.5  # a discriminating case, not 0 = 0
    assert metrics["bleu4"] == pytest.approx(bleu4, rel=1e-9, abs=1e-12)
    assert metrics["cider_d"] == pytest.approx(cider, rel=1e-9, abs=1e-12)


@needs_java
def test_the_python_tokenizer_agrees_with_the_java_one_on_tricky_captions():
    """`ptb_tokenize` gives the Java PTBTokenizer's tokens (after pycocoevalcap's punctuation
    removal) on every tricky caption, so the fallback's scores equal the Java pipeline's here."""
    texts = [t for cand, refs in TRICKY for t in [cand, *refs]]
    assert [ptb_tokenize(t) for t in texts] == java_ptb_tokenize(texts)
    cands, refs = [c for c, _ in TRICKY], [r for _, r in TRICKY]
    assert captioning_metrics(cands, refs, "python") == captioning_metrics(cands, refs, "java")


@needs_java
def test_the_python_tokenizers_stated_difference():
    """The module docstring's stated difference: Stanford's context rules for abbreviations
    ("no. 3" keeps its period) and number+unit fragments are not reproduced by `ptb_tokenize`."""
    assert java_ptb_tokenize(["no. 3", "3/4ths"]) == [["no.", "3"], ["3/4ths"]]
    assert [ptb_tokenize("no. 3"), ptb_tokenize("3/4ths")] == [["no", "3"], ["3/4", "ths"]]
