"""The loop's self-attention forward (`vla.models.attention`): the same outputs and gradients as
`nn.MultiheadAttention`'s own, from the same weights; every call it does not cover goes to the
module's own forward; a deep copy of a model attends with its own weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vla.models.attention import fast_self_attention


def _pair(batch_first: bool = True, dropout: float = 0.0):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=batch_first, dropout=dropout)
    fast = copy.deepcopy(ref)
    assert fast_self_attention(fast) == 1
    return ref, fast


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_same_outputs_and_gradients_as_multihead_attention(batch_first, causal):
    """Self-attention (open_clip's call: need_weights=False, a float causal mask in the text
    tower) gives nn.MultiheadAttention's outputs and parameter/input gradients within rounding."""
    ref, fast = _pair(batch_first)
    x = torch.randn(5, 7, 32) if batch_first else torch.randn(7, 5, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1) if causal else None
    outs, grads = [], []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        out, weights = m(xi, xi, xi, need_weights=False, attn_mask=mask)
        assert weights is None
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([xi.grad, *(p.grad for p in m.parameters())])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_fast, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-6)


def test_uncovered_calls_use_the_module_forward():
    """Attention weights asked for, a boolean mask, cross-attention and training dropout are the
    module's own forward's (weights returned, the same numbers)."""
    ref, fast = _pair()
    x, y = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    out_r, w_r = ref(x, x, x)  # need_weights=True by default
    out_f, w_f = fast(x, x, x)
    assert w_f is not None
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(w_f, w_r)
    bool_mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    torch.testing.assert_close(fast(x, x, x, need_weights=False, attn_mask=bool_mask)[0],
                               ref(x, x, x, need_weights=False, attn_mask=bool_mask)[0])
    torch.testing.assert_close(fast(y, x, x, need_weights=False)[0], ref(y, x, x, need_weights=False)[0])
    ref_d, fast_d = _pair(dropout=0.5)
    torch.manual_seed(1)
    a = ref_d(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(fast_d(x, x, x, need_weights=False)[0], a)


def test_a_deep_copy_attends_with_its_own_weights():
    """A copied model (an EMA teacher, a snapshot) uses the copy's parameters, not the original's."""
    _, fast = _pair()
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        twin.out_proj.weight.zero_()
        twin.out_proj.bias.fill_(1.0)
    x = torch.randn(2, 4, 32)
    assert torch.equal(twin(x, x, x, need_weights=False)[0], torch.ones(2, 4, 32))
    assert not torch.equal(fast(x, x, x, need_weights=False)[0], torch.ones(2, 4, 32))
