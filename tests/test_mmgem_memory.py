"""The MM-GEM memory bench's measure: bytes autograd saves for backward, storages counted once,
and the per-sample slope that checkpointing shrinks (tiny configs here; the real ones on demand)."""

from __future__ import annotations

import torch


def test_saved_bytes_counts_each_saved_storage_once() -> None:
    from vla.bench.mmgem_memory import saved_bytes

    a = torch.randn(10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    assert saved_bytes(lambda: (a * b).sum()) == 2 * 10 * 4
    assert saved_bytes(lambda: (a * a * a).sum()) == 10 * 4 + 10 * 4  # a once, a·a once


def test_per_sample_activations_are_positive_and_checkpointing_shrinks_them(monkeypatch) -> None:
    import vla.bench.mmgem_memory as bench

    monkeypatch.setattr(bench, "TINYLLAMA", dict(vocab_size=600, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2,
                                                 num_key_value_heads=1, max_position_embeddings=128,
                                                 bos_token_id=1, eos_token_id=2))
    plain = bench.measure("vla-micro-clip", 16, grad_checkpointing=False)
    ckpt = bench.measure("vla-micro-clip", 16, grad_checkpointing=True)
    assert 0 < ckpt["activation_bytes_per_sample_fp32"] < plain["activation_bytes_per_sample_fp32"]
    e = bench.estimate(plain, 256)
    assert e["peak_gib_conservative"] > e["peak_gib_bf16_half"] > e["weights_grads_lamb_gib"] > 0


def test_stage2_measures_only_the_heads_and_prompts_as_trained_and_image_captions_add_activations(monkeypatch) -> None:
    """Stage 2's figure is its own step: trained = h3 + the soft prompts + h4 (the tower and LM
    frozen, counted at 4 bytes each), activations from the frozen LM's caption rows, more with
    image_captions, fewer with checkpointing."""
    import vla.bench.mmgem_memory as bench

    monkeypatch.setattr(bench, "TINYLLAMA", dict(vocab_size=600, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2,
                                                 num_key_value_heads=1, max_position_embeddings=128,
                                                 bos_token_id=1, eos_token_id=2))
    kw = dict(stage="stage2-roi", soft_prompts=4)
    plain = bench.measure("vla-micro-clip", 16, grad_checkpointing=False, **kw)
    mixed = bench.measure("vla-micro-clip", 16, grad_checkpointing=False, image_captions=True, **kw)
    ckpt = bench.measure("vla-micro-clip", 16, grad_checkpointing=True, **kw)
    joint = bench.measure("vla-micro-clip", 16, grad_checkpointing=False)
    assert 0 < plain["trained_parameters"] < plain["frozen_parameters"]
    assert plain["trained_parameters"] < joint["trained_parameters"]
    assert 0 < ckpt["activation_bytes_per_sample_fp32"] < plain["activation_bytes_per_sample_fp32"] \
        < mixed["activation_bytes_per_sample_fp32"]
    e = bench.estimate(plain, 8)
    assert e["weights_grads_lamb_gib"] * bench.GIB == 16 * plain["trained_parameters"] + 4 * plain["frozen_parameters"]
