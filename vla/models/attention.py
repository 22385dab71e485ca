"""Self-attention without the layout copies of `nn.MultiheadAttention`'s training path.

`nn.MultiheadAttention` (open_clip's towers use it, batch-first) computes in sequence-first
layout: a batch-first input is transposed before the packed q/k/v projection (a strided matmul
input, copied), the projection is split with a `.contiguous()` copy of all three (and a zero
fill of the packed gradient in the backward), and the heads are permuted back with another copy.
On the CPU those copies cost about as much as the attention itself at a small width.

`fast_self_attention(model)` gives each such module of `model` a forward that computes the same
function from the same parameters, batch-first throughout:

    q, k, v = split(x W_inᵀ + b_in)               (one matmul on the contiguous input; views)
    out     = softmax(q kᵀ / √d_head + mask) v     (`scaled_dot_product_attention`, per head)
    y       = concat_heads(out) W_outᵀ + b_out

The same ops in another memory layout: equal within float rounding. A call the fast path does
not cover (attention weights asked for, a key padding or boolean mask, cross-attention, dropout
while training, bias_k / add_zero_attn, separate q/k/v weights) goes to the module's own forward.
Parameters, state dicts and checkpoints are unchanged. The two projections use the linear that
`vla.models.onednn_linear` records on the module, `F.linear` otherwise.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import nn


def fast_self_attention(model: nn.Module) -> int:
    """Give every `nn.MultiheadAttention` in `model` the fast self-attention forward (bound to the
    module, so a deep copy of the model gets its own); returns how many modules have it."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n


def _forward(mha: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
             attn_mask=None, average_attn_weights=True, is_causal=False):
    if (need_weights or key_padding_mask is not None or is_causal or not (query is key and key is value)
            or query.dim() != 3 or mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn
            or (mha.training and mha.dropout > 0)
            or (attn_mask is not None and (attn_mask.dim() != 2 or not attn_mask.is_floating_point()))):
        return nn.MultiheadAttention.forward(
            mha, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
    x = query if mha.batch_first else query.transpose(0, 1)  # (N, L, E)
    n, length, width = x.shape
    heads = mha.num_heads
    linear = getattr(mha, "_vla_linear", F.linear)  # oneDNN's where `onednn_linear` gave it
    qkv = linear(x, mha.in_proj_weight, mha.in_proj_bias).view(n, length, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, L, d_head), views
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    out = linear(out.transpose(1, 2).reshape(n, length, width), mha.out_proj.weight, mha.out_proj.bias)
    return (out if mha.batch_first else out.transpose(0, 1)), None
