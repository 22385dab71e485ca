"""DCLIP's ViT-L tower switches on small tensors: 2-D RoPE (the rotation by hand, the relative-
position property, the attention with zero angles, a tower it cannot take) and the three-cluster
embedding aggregation (by hand); a tower with them saved and loaded again."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vla.errors import UserError
from vla.models.dclip.vision_variants import (RopeSelfAttention, VisionVariant, apply_clusters, apply_rope_2d,
                                        apply_variant, cluster_pool, grid_positions, read_variant, rope_angles,
                                        rotate, save_variant)


def test_rotary_on_a_tiny_tensor_equals_the_hand_computation():
    # head dimension 8: two pairs turn with the row y (frequencies 1 and 100^-1/2), two with the column x
    angles = rope_angles(torch.tensor([[0, 0], [2, 3]]), 8, base=100.0)
    f = [1.0, 0.1]
    assert angles[0].tolist() == [0, 0, 0, 0]
    assert angles[1].tolist() == pytest.approx([2 * f[0], 2 * f[1], 3 * f[0], 3 * f[1]])
    x = torch.arange(1.0, 17.0, dtype=torch.float64).view(2, 8)
    got = rotate(x, angles)
    torch.testing.assert_close(got[0], x[0])  # position (0, 0): no rotation
    want = []
    for j, theta in enumerate([2 * f[0], 2 * f[1], 3 * f[0], 3 * f[1]]):
        a, b = x[1, 2 * j].item(), x[1, 2 * j + 1].item()
        want += [a * math.cos(theta) - b * math.sin(theta), a * math.sin(theta) + b * math.cos(theta)]
    assert got[1].tolist() == pytest.approx(want, abs=1e-12)


def test_shifting_every_patch_position_leaves_q_dot_k_unchanged():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=g, dtype=torch.float64), torch.randn(6, 16, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 7, (6, 2), generator=g)
    scores = rotate(q, rope_angles(pos, 16)) @ rotate(k, rope_angles(pos, 16)).T
    shifted = pos + torch.tensor([3, -5])
    scores2 = rotate(q, rope_angles(shifted, 16)) @ rotate(k, rope_angles(shifted, 16)).T
    torch.testing.assert_close(scores, scores2, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(scores, q @ k.T)  # and the positions do matter


def test_rope_attention_with_zero_angles_is_plain_multihead_attention():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).double()
    rope = RopeSelfAttention(16, 2, batch_first=True).double()
    rope.load_state_dict(mha.state_dict())
    assert rope.state_dict().keys() == mha.state_dict().keys()  # open_clip's weight layout is kept
    rope.set_rope(torch.zeros(4, 4, dtype=torch.float64), prefix=1)
    x = torch.randn(3, 5, 16, dtype=torch.float64)  # a class token + 4 patches
    torch.testing.assert_close(rope(x, x, x)[0], mha(x, x, x, need_weights=False)[0])
    # with a 2×2 grid: queries and keys of the 4 patches rotated by their (y, x), the class token's not
    angles = rope_angles(grid_positions(2, 2), 8)
    rope.set_rope(angles, prefix=1)
    wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    bq, bk, bv = mha.in_proj_bias.detach().chunk(3)
    want = torch.zeros(3, 5, 16, dtype=torch.float64)
    for h in range(2):
        c = slice(8 * h, 8 * h + 8)
        q, k, v = x @ wq[c].T + bq[c], x @ wk[c].T + bk[c], x @ wv[c].T + bv[c]
        q = torch.cat([q[:, :1], rotate(q[:, 1:], angles)], 1)
        k = torch.cat([k[:, :1], rotate(k[:, 1:], angles)], 1)
        want[..., c] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(8), -1) @ v
    want = want @ mha.out_proj.weight.detach().T + mha.out_proj.bias.detach()
    torch.testing.assert_close(rope(x, x, x)[0], want)


def test_rope_tower_zeroes_absolute_positions_and_refuses_other_towers():
    from vla.models.clip import load_clip

    clip = load_clip("vla-micro-clip")
    keys = clip.model.state_dict().keys()
    apply_rope_2d(clip.model.visual)
    v = clip.model.visual
    assert torch.count_nonzero(v.positional_embedding) == 0 and not v.positional_embedding.requires_grad
    assert all(isinstance(b.attn, RopeSelfAttention) for b in v.transformer.resblocks)
    assert clip.model.state_dict().keys() == keys
    with torch.no_grad():
        assert clip.model.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    with pytest.raises(UserError, match="rope_2d: its image tower is a Linear.*set rope_2d off"):
        apply_rope_2d(nn.Linear(2, 2))


def test_three_cluster_aggregation_by_hand():
    # six 2-d tokens in three obvious groups of different sizes (3, 2, 1)
    tokens = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.95, -0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]]])
    groups = [[0, 1, 2], [3, 4], [5]]
    means = [tokens[0, g].mean(0) for g in groups]
    want = sum(means) / 3  # each cluster counts once, however many tokens it has
    torch.testing.assert_close(cluster_pool(tokens, k=3, iters=5), want[None])
    assert not torch.allclose(want, tokens[0].mean(0))  # not the plain token mean
    tokens.requires_grad_(True)
    cluster_pool(tokens, 3).sum().backward()  # gradients flow through the means
    torch.testing.assert_close(tokens.grad[0, :, 0], torch.tensor([1 / 9] * 3 + [1 / 6] * 2 + [1 / 3]))


def test_variant_tower_round_trips_through_save_and_load(tmp_path):
    from vla.models.clip import load_clip, save_clip

    clip = load_clip("vla-micro-clip")
    variant = VisionVariant(rope_2d=True, clusters=3)
    apply_variant(clip.model.visual, variant)
    with torch.no_grad():  # the zeroed positions must not come back on loading
        clip.model.visual.conv1.weight.mul_(1.5)
    save_clip(clip, tmp_path / "m")
    save_variant(tmp_path / "m", variant)
    assert read_variant(tmp_path / "m") == variant
    again = load_clip(f"local-dir:{tmp_path / 'm'}")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.model.encode_image(x), clip.model.eval().encode_image(x))
    with pytest.raises(UserError, match="clusters must be 0"):
        VisionVariant(clusters=1)
    apply_clusters(clip.model.visual, 3, 5)  # idempotent enough: re-applying keeps the same pooling
