"""DCLIP's meta-teacher against a reference written out by hand (per sample, per head, per token),
on tiny float64 tensors: both attention streams, the τ-pooling and the region weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vla.models.dclip import MetaTeacher, TeacherConfig, attention_pool, clip_text_states, region_weights

D, HEADS = 8, 2


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) if x != float("-inf") else 0.0 for x in xs]
    return [v / sum(e) for v in e]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def _weights(conf, area, regions, text, n_real) -> list[float]:
    s = [conf[k] * area[k] * max(_cos(regions[k], text), 0.0) for k in range(n_real)]
    total = sum(s)
    w = [v / total for v in s] if total > 0 else [1.0 / n_real] * n_real
    return w + [0.0] * (len(conf) - n_real)


def _mha(layer: torch.nn.MultiheadAttention, q_in, kv_in, n_keys: int, prior: list[float] | None):
    """One sample through nn.MultiheadAttention's maths, written out: per head and per query,
    scores over the first n_keys keys (+ prior), softmax, weighted values; then the output map."""
    wq, wk, wv = layer.in_proj_weight.chunk(3)
    bq, bk, bv = layer.in_proj_bias.chunk(3)
    q, k, v = (x.detach() for x in (q_in @ wq.T + bq, kv_in @ wk.T + bk, kv_in @ wv.T + bv))
    dh = D // HEADS
    out = torch.zeros(q_in.shape[0], D, dtype=q_in.dtype)
    for h in range(HEADS):
        cols = slice(h * dh, (h + 1) * dh)
        for i in range(q_in.shape[0]):
            scores = [float(q[i, cols] @ k[j, cols]) / math.sqrt(dh) + (math.log(prior[j]) if prior and prior[j] > 0
                                                                        else (float("-inf") if prior else 0.0))
                      for j in range(n_keys)]
            a = _softmax(scores)
            out[i, cols] = sum(a[j] * v[j, cols] for j in range(n_keys))
    return out @ layer.out_proj.weight.T + layer.out_proj.bias


def _pool(x: torch.Tensor, n: int, tau: float, prior: list[float] | None = None) -> torch.Tensor:
    mean = sum(x[i] for i in range(n)) / n
    logits = [_cos(x[i], mean) / tau + (math.log(prior[i]) if prior and prior[i] > 0 else
                                         (float("-inf") if prior else 0.0)) for i in range(n)]
    a = _softmax(logits)
    return sum(a[i] * x[i] for i in range(n))


def _reference(teacher: MetaTeacher, tokens, n_tokens, text, regions, n_regions, conf, area) -> torch.Tensor:
    outs = []
    for b in range(tokens.shape[0]):
        t = F.normalize(tokens[b], dim=-1)
        r = F.normalize(regions[b], dim=-1)
        nt, nr = n_tokens[b], n_regions[b]
        w = _weights(conf[b].tolist(), area[b].tolist(), r, text[b], nr)
        # stream 1: text tokens attend to the regions, with log w on the logits
        t2 = F.layer_norm(t + _mha(teacher.text_to_regions, t, r, nr, w[:nr]), (D,),
                          teacher.text_norm.weight, teacher.text_norm.bias)
        # stream 2, in parallel on the inputs: regions attend to the real text tokens
        r2 = F.layer_norm(r + _mha(teacher.regions_to_text, r, t, nt, None), (D,),
                          teacher.region_norm.weight, teacher.region_norm.bias)
        z_text = _pool(t2, nt, 2.0)
        z_image = _pool(r2, nr, 2.0, prior=w[:nr])
        outs.append(0.5 * z_text + 0.5 * z_image)
    return torch.stack(outs)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 4, D, generator=g, dtype=torch.float64)
    regions = torch.randn(2, 3, D, generator=g, dtype=torch.float64)
    text = torch.randn(2, D, generator=g, dtype=torch.float64)
    regions[0, 1] = text[0] + 0.1 * regions[0, 1]  # a text-relevant region, so weights differ
    n_tokens, n_regions = [4, 2], [3, 2]  # sample 1 is padded on both sides
    token_mask = torch.tensor([[True] * 4, [True, True, False, False]])
    region_mask = torch.tensor([[True] * 3, [True, True, False]])
    conf = torch.tensor([[1.0, 0.9, 0.3], [1.0, 0.5, 0.0]], dtype=torch.float64)
    area = torch.tensor([[1.0, 0.2, 0.05], [1.0, 0.3, 0.0]], dtype=torch.float64)
    return tokens, token_mask, n_tokens, text, regions, region_mask, n_regions, conf, area


def test_teacher_forward_matches_the_hand_written_reference():
    torch.manual_seed(0)
    teacher = MetaTeacher(TeacherConfig(dim=D, heads=HEADS)).double().eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial norms, so the LayerNorm affine part is checked too
        teacher.text_norm.weight.uniform_(0.5, 1.5)
        teacher.region_norm.bias.uniform_(-0.2, 0.2)
    tokens, token_mask, n_tokens, text, regions, region_mask, n_regions, conf, area = _inputs()
    got = teacher(tokens, token_mask, text, regions, region_mask, conf, area)
    want = _reference(teacher, tokens, n_tokens, text, regions, n_regions, conf, area)
    assert got.shape == (2, D)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_padding_and_zero_weight_regions_do_not_change_the_output():
    teacher = MetaTeacher(TeacherConfig(dim=D, heads=HEADS)).double().eval()
    tokens, token_mask, _, text, regions, region_mask, _, conf, area = _inputs(1)
    base = teacher(tokens, token_mask, text, regions, region_mask, conf, area)
    tokens2, regions2 = tokens.clone(), regions.clone()
    tokens2[1, 2:] = 99.0  # padded tokens
    regions2[1, 2] = -7.0  # a padded region
    torch.testing.assert_close(teacher(tokens2, token_mask, text, regions2, region_mask, conf, area), base)
    # a region pointing away from the text has weight 0: nothing attends to it
    regions3 = regions.clone()
    regions3[0, 2] = -text[0]
    conf3 = conf.clone()
    out_a = teacher(tokens, token_mask, text, regions3, region_mask, conf3, area)
    conf3[0, 2] = 0.7
    out_b = teacher(tokens, token_mask, text, regions3, region_mask, conf3, area)
    # (stream 2 still uses the region's own query row, but not its pooling weight: w = 0 either way)
    torch.testing.assert_close(out_a, out_b)


def test_region_weights_by_hand():
    regions = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]])
    text = torch.tensor([[1.0, 0.0]])
    conf = torch.tensor([[1.0, 0.5, 0.9, 0.8]])
    area = torch.tensor([[1.0, 0.4, 0.5, 0.3]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last is padding
    s = [1.0 * 1.0 * 1.0, 0.5 * 0.4 * (1 / math.sqrt(2)), 0.0, 0.0]  # cos −1 is clamped to 0
    want = torch.tensor([[v / sum(s) for v in s]])
    torch.testing.assert_close(region_weights(conf, area, regions, text, mask), want)
    # every real region scoring 0: uniform over the real ones
    got = region_weights(conf, area, -regions, text, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0, 0.0, 0.0]]) + torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_attention_pool_temperature():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, True, True]])
    mean = x[0].mean(0)
    for tau in (2.0, 0.1):
        a = torch.tensor(_softmax([_cos(x[0, i], mean) / tau for i in range(3)]))
        torch.testing.assert_close(attention_pool(x, mask, tau), (a[:, None] * x[0]).sum(0, keepdim=True))


def test_clip_text_states_pool_to_encode_text():
    """The pooled output is encode_text; the token states are the tokens strictly between start and
    end (a 16-token context truncated at 16 keeps its end token: 14 between)."""
    from vla.models.clip import load_clip

    torch.manual_seed(0)
    clip = load_clip("vla-micro-clip")
    tokens = clip.tokenizer(["a red circle", "a small blue square left of a large green star above a yellow triangle on grey"])
    with torch.no_grad():
        states, mask, pooled = clip_text_states(clip.model.eval(), tokens)
        want = clip.model.encode_text(tokens)
    torch.testing.assert_close(pooled, want)
    assert states.shape == (2, 14, clip.embed_dim)
    assert torch.equal(mask.sum(1), tokens.argmax(-1) - 1) and mask[1].all()  # sample 1 is truncated at 16 tokens


def test_average_fusion_has_no_attention_and_matches_the_hand_written_reference():
    """`fusion: average` (no bidirectional attention): each stream τ-pooled from its own inputs,
    the image stream with the region weights, then ½/½; nothing to train."""
    teacher = MetaTeacher(TeacherConfig(dim=D, heads=HEADS, fusion="average")).double().eval()
    assert list(teacher.parameters()) == [] and teacher.state_dict() == {}
    tokens, token_mask, n_tokens, text, regions, region_mask, n_regions, conf, area = _inputs(2)
    got = teacher(tokens, token_mask, text, regions, region_mask, conf, area)
    want = []
    for b in range(2):
        t, r = F.normalize(tokens[b], dim=-1), F.normalize(regions[b], dim=-1)
        w = _weights(conf[b].tolist(), area[b].tolist(), r, text[b], n_regions[b])
        want.append(0.5 * _pool(t, n_tokens[b], 2.0) + 0.5 * _pool(r, n_regions[b], 2.0, prior=w[:n_regions[b]]))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="fusion"):
        TeacherConfig(dim=D, heads=HEADS, fusion="sum")
