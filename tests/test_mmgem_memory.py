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
