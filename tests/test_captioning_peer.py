"""vla's BLEU-4 and CIDEr-D against pycocoevalcap's own `Bleu(4)` and `Cider` scorers (the COCO
caption evaluation code; its `Cider` is CIDEr-D: clipped n-gram weights and the length penalty).

pycocoevalcap's PTBTokenizer runs Java, so both sides get text already tokenised the same way:
vla's `ptb_tokenize`, joined with spaces, is fed to the scorers directly (they split on spaces).
"""

from __future__ import annotations

import random

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vla.evaluate.captioning import bleu, cider_d, ptb_tokenize

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
    assert bleu(candidates, references) == pytest.approx(bleu4, rel=1e-9, abs=1e-12)
    if len(candidates) > 1:  # CIDEr's document frequencies need a corpus (log 1 = 0 for one image)
        assert cider_d(candidates, references) == pytest.approx(Cider().compute_score(gts, res)[0],
                                                                rel=1e-9, abs=1e-12)
