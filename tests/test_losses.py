"""Every loss against a value computed by hand (plain Python loops), on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vla.losses import (
    ClipLoss,
    LogitScale,
    caption_loss,
    dclip_student_loss,
    dclip_teacher_loss,
    distill_loss,
    gather_features,
    infonce,
    instance_alignment_loss,
    mmgem_loss,
    preservation_loss,
    self_distillation_loss,
    structure_alignment_loss,
    teacher_image_negatives_loss,
)

# --- hand computations: lists of floats, no torch -----------------------------------------------


def _dot(x: list[float], y: list[float]) -> float:
    return sum(a * b for a, b in zip(x, y))


def _dist(x: list[float], y: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y)))


def _ce(row: list[float], target: int) -> float:
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def _symmetric_infonce(a: list[list[float]], b: list[list[float]], scale: float) -> float:
    n = len(a)
    logits = [[scale * _dot(a[i], b[j]) for j in range(n)] for i in range(n)]
    per_a = sum(_ce(logits[i], i) for i in range(n)) / n
    per_b = sum(_ce([logits[j][i] for j in range(n)], i) for i in range(n)) / n
    return (per_a + per_b) / 2


def _smooth_l1(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1.0 else d - 0.5


def _struct(s: list[list[float]], u: list[list[float]]) -> float:
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    assert len(pairs) == n * (n - 1) // 2
    return sum(_smooth_l1(_dist(s[i], s[j]), _dist(u[i], u[j])) for i, j in pairs)


def _sq_err(s: list[list[float]], u: list[list[float]]) -> float:
    return sum((a - b) ** 2 for x, y in zip(s, u) for a, b in zip(x, y))


def _unit(rows: list[list[float]]) -> list[list[float]]:
    return [[v / math.sqrt(_dot(r, r)) for v in r] for r in rows]


IMG = _unit([[1.0, 0.0], [0.6, 0.8], [-0.3, 1.0]])
TXT = _unit([[0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])

# Not normalised on purpose: distances that differ by more and by less than 1 exercise both
# branches of smooth L1.
S = [[0.0, 0.0], [3.0, 0.0], [0.0, 0.5], [1.0, 1.0]]
U = [[0.0, 0.0], [0.5, 0.0], [0.0, 0.7], [2.0, 2.0]]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --- contrastive ---------------------------------------------------------------------------------


def test_clip_loss_matches_hand_computation_on_3x2() -> None:
    loss = ClipLoss()(t(IMG), t(TXT), torch.tensor(2.0, dtype=torch.float64))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(_symmetric_infonce(IMG, TXT, 2.0), rel=1e-12)


def test_clip_loss_is_symmetric_in_its_two_sides() -> None:
    loss = ClipLoss()
    assert loss(t(IMG), t(TXT), 5.0).item() == pytest.approx(loss(t(TXT), t(IMG), 5.0).item(), rel=1e-12)


def test_gather_features_is_identity_for_one_process() -> None:
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    ga, gb = gather_features(a, b, local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    assert ga is a and gb is b


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100() -> None:
    scale = LogitScale()
    assert scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(100.0, rel=1e-6)
    scale().backward()
    # Above the bound the clamp passes no gradient: the parameter stays where the optimiser left it.
    assert scale.log_scale.grad is not None and scale.log_scale.grad.item() == 0.0


def test_logit_scale_min_temperature_sets_the_bound() -> None:
    scale = LogitScale(init_temperature=0.07, min_temperature=0.05)
    with torch.no_grad():
        scale.log_scale.fill_(10.0)
    assert scale().item() == pytest.approx(20.0, rel=1e-6)
    with pytest.raises(ValueError):
        LogitScale(init_temperature=0.01, min_temperature=0.07)


# --- ProCLIP -------------------------------------------------------------------------------------


def test_instance_alignment_is_sum_of_squared_errors() -> None:
    assert instance_alignment_loss(t(S), t(U)).item() == pytest.approx(_sq_err(S, U), rel=1e-12)


def test_structure_alignment_sums_smooth_l1_over_pairs() -> None:
    expected = _struct(S, U)
    # both smooth-L1 branches are exercised by this data
    gaps = [abs(_dist(S[i], S[j]) - _dist(U[i], U[j])) for i in range(4) for j in range(i + 1, 4)]
    assert min(gaps) < 1.0 < max(gaps)
    assert structure_alignment_loss(t(S), t(U)).item() == pytest.approx(expected, rel=1e-12)


def test_distill_loss_covers_both_variants_in_ins_and_the_first_in_struct() -> None:
    s2 = [[1.0, 2.0], [0.0, 0.0], [0.5, 0.5], [3.0, 1.0]]
    u2 = [[1.0, 1.0], [0.0, 1.0], [0.5, 0.0], [0.0, 1.0]]
    out = distill_loss(t(S), t(U), t(s2), t(u2))
    assert out["ins"].item() == pytest.approx(_sq_err(S, U) + _sq_err(s2, u2), rel=1e-12)
    assert out["struct"].item() == pytest.approx(_struct(S, U), rel=1e-12)
    assert out["loss"].item() == pytest.approx(out["ins"].item() + out["struct"].item(), rel=1e-12)
    single = distill_loss(t(S), t(U))
    assert single["ins"].item() == pytest.approx(_sq_err(S, U), rel=1e-12)
    with pytest.raises(ValueError):
        distill_loss(t(S), t(U), t(s2))


def test_self_distillation_loss_trains_the_student_not_the_teacher() -> None:
    student = t(S).requires_grad_(True)
    teacher = t(U).requires_grad_(True)
    out = self_distillation_loss(student, teacher)
    assert out["loss"].item() == pytest.approx(_sq_err(S, U) + _struct(S, U), rel=1e-12)
    out["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# --- DCLIP ---------------------------------------------------------------------------------------


def test_infonce_with_fixed_temperature() -> None:
    expected = _symmetric_infonce(IMG, TXT, 1 / 0.05)
    assert infonce(t(IMG), t(TXT), 0.05).item() == pytest.approx(expected, rel=1e-12)


def test_dclip_student_loss_matches_hand_computation() -> None:
    teacher = [[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]]  # unnormalised: cos must normalise it
    original = [[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]

    def one_minus_cos(xs: list[list[float]], ys: list[list[float]]) -> float:
        return sum(1 - _dot(x, y) / math.sqrt(_dot(x, x) * _dot(y, y)) for x, y in zip(xs, ys)) / len(xs)

    distill = one_minus_cos(IMG, teacher)
    contrastive = _symmetric_infonce(IMG, TXT, 1 / 0.05)
    preserve = one_minus_cos(IMG, original)

    out = dclip_student_loss(t(IMG), t(teacher), t(TXT))
    assert set(out) == {"loss", "distill", "contrastive"}
    assert out["distill"].item() == pytest.approx(distill, rel=1e-12)
    assert out["contrastive"].item() == pytest.approx(contrastive, rel=1e-12)
    assert out["loss"].item() == pytest.approx(distill + contrastive, rel=1e-12)

    out = dclip_student_loss(t(IMG), t(teacher), t(TXT), preserve=t(original), preserve_weight=0.5)
    assert out["preserve"].item() == pytest.approx(preserve, rel=1e-12)
    assert out["loss"].item() == pytest.approx(distill + contrastive + 0.5 * preserve, rel=1e-12)


def test_dclip_teacher_loss_normalises_and_detaches_the_text() -> None:
    teacher = [[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]]  # ½ z_text + ½ z_image is not unit length
    text = [[3.0, 0.3], [1.0, 1.0], [0.0, 2.0]]
    expected = _symmetric_infonce(_unit(teacher), _unit(text), 1 / 0.05)
    tt, xt = t(teacher).requires_grad_(True), t(text).requires_grad_(True)
    loss = dclip_teacher_loss(tt, xt)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert tt.grad is not None and xt.grad is None  # the frozen CLIP text embedding is a target


def test_teacher_image_negatives_loss_by_hand() -> None:
    """Column 0 is the caption's own image: L = mean_j [log Σ_m exp(s_jm / τ) − s_j0 / τ]."""
    scores = [[0.9, 0.1, -0.2], [0.3, 0.5, 0.4]]
    want = sum(math.log(sum(math.exp(v / 0.05) for v in row)) - row[0] / 0.05 for row in scores) / 2
    assert teacher_image_negatives_loss(t(scores), 0.05).item() == pytest.approx(want, rel=1e-12)


def test_preservation_loss_by_hand() -> None:
    original = [[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]
    want = sum(1 - _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b)) for a, b in zip(IMG, original)) / 3
    assert preservation_loss(t(IMG), t(original)).item() == pytest.approx(want, rel=1e-12)


# --- MM-GEM --------------------------------------------------------------------------------------


def _caption_batch() -> tuple[list[list[list[float]]], list[list[int]]]:
    logits = [
        [[0.1, 0.2, 0.3], [1.0, -1.0, 0.0], [0.5, 0.5, 2.0], [0.0, 0.0, 0.0]],
        [[2.0, 0.0, 1.0], [0.3, 0.1, -0.4], [1.5, -0.5, 0.2], [0.7, 0.7, 0.1]],
    ]
    # -100 marks the visual prefix / [CAP] / padding; sequence 0 has 2 caption tokens, sequence 1 has 3
    targets = [[-100, -100, 2, 0], [-100, 1, 0, 2]]
    return logits, targets


def _hand_caption_loss(logits: list[list[list[float]]], targets: list[list[int]]) -> float:
    terms = [
        _ce(logits[b][pos - 1], targets[b][pos])  # position pos-1 predicts token pos
        for b in range(len(targets))
        for pos in range(1, len(targets[b]))
        if targets[b][pos] != -100
    ]
    assert len(terms) == 5  # the mean is over the batch's 5 caption tokens, not per sequence
    return sum(terms) / len(terms)


def test_caption_loss_is_shifted_next_token_ce_over_caption_tokens() -> None:
    logits, targets = _caption_batch()
    got = caption_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(targets))
    assert got.item() == pytest.approx(_hand_caption_loss(logits, targets), rel=1e-12)


def test_caption_loss_honours_a_custom_ignore_index() -> None:
    logits, targets = _caption_batch()
    pad = [[-1 if v == -100 else v for v in row] for row in targets]
    got = caption_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(pad), ignore_index=-1)
    assert got.item() == pytest.approx(_hand_caption_loss(logits, targets), rel=1e-12)


def test_mmgem_loss_is_the_unweighted_sum() -> None:
    logits, targets = _caption_batch()
    out = mmgem_loss(
        t(IMG[:2]), t(TXT[:2]), torch.tensor(3.0, dtype=torch.float64),
        torch.tensor(logits, dtype=torch.float64), torch.tensor(targets),
    )
    emb = _symmetric_infonce(IMG[:2], TXT[:2], 3.0)
    gen = _hand_caption_loss(logits, targets)
    assert out["emb"].item() == pytest.approx(emb, rel=1e-12)
    assert out["gen"].item() == pytest.approx(gen, rel=1e-12)
    assert out["loss"].item() == pytest.approx(emb + gen, rel=1e-12)


def test_losses_are_differentiable_in_float32() -> None:
    # The training dtype: every loss must give finite gradients, including pdist on equal rows.
    x = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    y = F.normalize(torch.randn(4, 8), dim=-1)
    x_dup = torch.cat([x[:1], x[:1], x[2:]])  # two identical rows: zero distance
    total = (
        ClipLoss()(x, y, torch.tensor(10.0))
        + distill_loss(x_dup, y)["loss"]
        + dclip_student_loss(x, y, y)["loss"]
    )
    total.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
