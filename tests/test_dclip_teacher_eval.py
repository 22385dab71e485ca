"""`vla eval-teacher`'s scoring: the teacher's score matrix and the recall computed from a matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vla.evaluate.retrieval import MODES, retrieval_metrics, score_retrieval_metrics
from vla.evaluate.teacher import teacher_score_matrix
from vla.models.dclip import MetaTeacher, TeacherConfig


def test_teacher_score_matrix_is_one_teacher_forward_per_pair():
    """Every entry [j, i] is cos(teacher(x_i, T_j), u_j) from a forward of that one pair on its
    unpadded inputs (caption j's own tokens, image i's own regions), whatever the batching: the
    texts are taken 2 at a time here (pair_batch 9 over 4 images), the last chunk a single text."""
    torch.manual_seed(0)
    d, m, n = 16, 5, 4
    teacher = MetaTeacher(TeacherConfig(dim=d, heads=2)).eval()
    lengths, sizes = [3, 1, 5, 2, 4], [1, 3, 2, 3]
    states = torch.zeros(m, max(lengths), d)
    tmask = torch.zeros(m, max(lengths), dtype=torch.bool)
    for j, length in enumerate(lengths):
        states[j, :length] = torch.randn(length, d)
        tmask[j, :length] = True
    pooled = torch.randn(m, d)
    k = max(sizes)
    regions = {"regions": torch.zeros(n, k, d), "conf": torch.zeros(n, k), "area": torch.zeros(n, k),
               "mask": torch.zeros(n, k, dtype=torch.bool)}
    for i, size in enumerate(sizes):
        regions["regions"][i, :size] = torch.randn(size, d)
        regions["conf"][i, :size] = torch.rand(size) * 0.7 + 0.3
        regions["area"][i, :size] = torch.rand(size) * 0.5 + 0.05
        regions["mask"][i, :size] = True

    scores = teacher_score_matrix(teacher, states, tmask, pooled, regions, pair_batch=9)

    expected = torch.empty(m, n)
    with torch.no_grad():
        for j, length in enumerate(lengths):
            for i, size in enumerate(sizes):
                emb = teacher(tokens=states[j:j + 1, :length], token_mask=tmask[j:j + 1, :length], text=pooled[j:j + 1],
                              regions=regions["regions"][i:i + 1, :size], region_mask=regions["mask"][i:i + 1, :size],
                              conf=regions["conf"][i:i + 1, :size], area=regions["area"][i:i + 1, :size])
                expected[j, i] = F.cosine_similarity(emb, pooled[j:j + 1]).item()
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert scores.std() > 0.01  # the pairs differ: a constant matrix would pass the comparison trivially


@pytest.mark.parametrize("mode", MODES)
def test_recall_from_a_score_matrix_is_recall_from_its_embeddings(mode):
    """`score_retrieval_metrics(text @ image.T)` is `retrieval_metrics(image, text)` in every tie mode,
    on embeddings with ties (entries rounded to a coarse grid) and an image without captions."""
    torch.manual_seed(1)
    images = F.normalize(torch.randn(30, 8), dim=-1)
    texts = F.normalize(torch.randn(70, 8), dim=-1)
    images, texts = (images * 2).round() / 2, (texts * 2).round() / 2   # coarse: many tied scores
    t2i = torch.randint(0, 29, (70,))                                   # image 29 has no caption
    ours = score_retrieval_metrics(texts @ images.T, t2i, mode=mode, chunk=16)
    theirs = retrieval_metrics(images, texts, t2i, mode=mode, chunk=16)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert theirs["image_retrieval_ties"] > 0 and theirs["text_retrieval_ties"] > 0


def test_mean_pairwise_cosine_is_the_mean_over_distinct_pairs():
    """The closed form (‖Σ e‖² − n) / (n(n − 1)) equals the mean of cos(e_i, e_i') over i ≠ i'."""
    torch.manual_seed(2)
    from vla.evaluate.teacher import mean_pairwise_cosine

    emb = F.normalize(torch.randn(3, 6, 5), dim=-1)
    cos = emb @ emb.transpose(1, 2)
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(mean_pairwise_cosine(emb), cos[:, off].mean(-1))
