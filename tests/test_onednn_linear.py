"""fp32 linears through oneDNN (`vla.models.onednn_linear`): the same outputs and gradients as
`F.linear` within float rounding, both orientations of the weight gradient, the calls it leaves to
`F.linear`, what `onednn_linear(model)` patches, the loop's `train.cpu_matmul` switch (oneDNN's
op really runs under "auto", never under "blas", and the two train to the same parameters), and
a compiled model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

from vla.errors import UserError
from vla.models.attention import fast_self_attention
from vla.models.onednn_linear import available, linear, onednn_linear, use_onednn
from vla.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not available(), reason="this torch has no oneDNN")


def _grads(fn, x, w, b):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    y = fn(x, w, b)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("in_features,out_features", [(24, 40), (40, 24), (16, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_same_outputs_and_gradients_as_f_linear(in_features, out_features, bias):
    """Forward, ∂x, ∂W (out < in, out > in, square: both ways the weight gradient is computed) and
    ∂b equal F.linear's within float rounding, on a 3-d batch-first input."""
    torch.manual_seed(0)
    x = torch.randn(6, 11, in_features)
    w = torch.randn(out_features, in_features)
    b = torch.randn(out_features) if bias else None
    ref = _grads(F.linear, x, w, b)
    got = _grads(linear, x, w, b)
    for g, r in zip(got, ref):
        if r is None:
            assert g is None
        else:
            assert g.shape == r.shape
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_strided_input_and_frozen_weight():
    """A transposed (non-contiguous) input is read correctly, and a frozen weight gets no
    gradient while the input still does."""
    torch.manual_seed(0)
    x = torch.randn(9, 5, 12).transpose(0, 1)  # (5, 9, 12), not contiguous
    w, b = torch.randn(7, 12), torch.randn(7)
    xi = x.clone().requires_grad_(True)
    y = linear(xi, w, b)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    xr = x.clone().requires_grad_(True)
    F.linear(xr, w, b).square().sum().backward()
    torch.testing.assert_close(xi.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_uncovered_calls_are_f_linear_exactly():
    """bf16 tensors, autocast and an empty batch take F.linear itself (bit-equal results)."""
    torch.manual_seed(0)
    w, b = torch.randn(8, 4), torch.randn(8)
    xb, wb, bb = torch.randn(3, 4).bfloat16(), w.bfloat16(), b.bfloat16()
    assert torch.equal(linear(xb, wb, bb), F.linear(xb, wb, bb))
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = linear(x, w, b), F.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    assert linear(torch.randn(0, 4), w, b).shape == (0, 8)


class _OwnForward(nn.Linear):
    def forward(self, x):  # a LoRA-style layer: its own forward must stay its own
        return super().forward(x) * 2


def test_what_onednn_linear_patches():
    """Plain nn.Linear layers and self-attention projections are given oneDNN; a subclass with its
    own forward is left alone; outputs stay F.linear's within rounding; state dicts are unchanged;
    a deep copy computes with its own weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), _OwnForward(16, 16), nn.Linear(16, 4))
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    ref, ref_attn = copy.deepcopy(model), copy.deepcopy(attn)
    fast_self_attention(ref_attn)
    fast_self_attention(attn)
    assert onednn_linear(model) == 2 and onednn_linear(attn) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[2])
    assert model.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    h = torch.randn(3, 5, 16)
    torch.testing.assert_close(attn(h, h, h, need_weights=False)[0], ref_attn(h, h, h, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].weight.zero_()
        twin[0].bias.zero_()
    assert torch.equal(twin[0](x), torch.zeros(3, 5, 16))  # the copy's own (zeroed) weights
    assert model[0](x).abs().sum() > 0


def test_cpu_matmul_setting():
    """train.cpu_matmul: auto and onednn use oneDNN on the CPU, blas and a CUDA device do not, and
    a value outside the three is a UserError naming them."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_onednn("auto", cpu) and use_onednn("onednn", cpu)
    assert not use_onednn("blas", cpu) and not use_onednn("auto", cuda)
    with pytest.raises(UserError, match="train.cpu_matmul.*auto, onednn, blas"):
        TrainConfig(cpu_matmul="mkl")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(12, 48), nn.Linear(48, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _batches(start):
    step = start
    while True:
        g = torch.Generator().manual_seed(step)
        yield {"x": torch.randn(16, 12, generator=g), "y": torch.randn(16, 3, generator=g)}
        step += 1


def _step(model, batch):
    return {"loss": F.mse_loss(model(batch["x"]), batch["y"])}


def _trained(tmp_path, backend: str, compile: bool = False):
    model = _Net()
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-2, warmup_steps=1, checkpoint_every=100, log_every=1,
                      device="cpu", cpu_matmul=backend, compile=compile)
    with profile() as prof:
        train(cfg, model, _step, _batches, tmp_path / f"{backend}-{compile}")
    calls = sum(e.count for e in prof.key_averages() if "_linear_pointwise" in e.key)
    return model, calls


def test_loop_uses_onednn_under_auto_and_trains_to_the_blas_parameters(tmp_path, monkeypatch):
    """The switch is live: oneDNN's op runs in the loop's steps under "auto" (forward and both
    backward products of each layer) and never under "blas"; the two runs end at the same
    parameters within float rounding."""
    monkeypatch.setenv("VLA_NO_PROGRESS", "1")
    fast, calls = _trained(tmp_path, "auto")
    ref, ref_calls = _trained(tmp_path, "blas")
    assert ref_calls == 0
    assert calls >= 6 * 2 * 2  # ≥ 6 steps × 2 layers × (forward + ∂W), plus ∂x for fc2
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_model_trains_through_onednn(tmp_path, monkeypatch):
    """Under train.compile inductor cannot lower mkldnn's op for a trainable weight; the opaque
    `vla::onednn_mm_t` op keeps oneDNN in the compiled graph, with the eager run's parameters."""
    monkeypatch.setenv("VLA_NO_PROGRESS", "1")
    compiled, calls = _trained(tmp_path, "auto", compile=True)
    ref, _ = _trained(tmp_path, "blas")
    assert calls > 0
    for (name, p), q in zip(compiled.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_onednn_linears_is_for_the_block_only():
    """The context patches a model for its block and restores it after; what was patched before
    (by the loop) stays patched; a model off the CPU is left alone."""
    from vla.models.onednn_linear import onednn_linears

    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with onednn_linears(model):
        assert "forward" in vars(model[0]) and "forward" in vars(model[1])
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[1])
    onednn_linear(model[1])
    with onednn_linears(model):
        pass
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1])


def test_encoders_run_through_onednn_with_blas_results():
    """`encode_text` / `encode_image` (through `inference`) and the embedder's `embed` use oneDNN's
    op on the CPU, with torch's own results within float rounding, and leave the model unpatched."""
    from vla.models.clip import load_clip
    from vla.models.embedder import embedder_from_config, EmbedderConfig

    torch.manual_seed(0)
    clip = load_clip("vla-micro-clip")
    texts = ["a red circle on a blue square", "two green triangles", "a small yellow star"]
    images = torch.rand(2, 3, 32, 32)
    with profile() as prof:
        feats = clip.encode_text(texts), clip.encode_image(images)
    assert sum(e.count for e in prof.key_averages() if "_linear_pointwise" in e.key) > 0
    assert not any("forward" in vars(m) for m in clip.model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        clip.model.eval()
        ref_text = clip.model.encode_text(clip.tokenize(texts), normalize=True)
        ref_image = clip.model.encode_image(images, normalize=True)
    torch.testing.assert_close(feats[0], ref_text, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats[1], ref_image, rtol=1e-4, atol=1e-5)

    embedder = embedder_from_config(EmbedderConfig(name="vla-tiny-qwen"))
    with profile() as prof:
        got = embedder.embed(texts)
    assert sum(e.count for e in prof.key_averages() if "_linear_pointwise" in e.key) > 0
    with torch.no_grad():
        ref = torch.cat([embedder._forward(embedder._encode([t], truncate=True)).float() for t in texts])
    ref = torch.nn.functional.normalize(ref, dim=-1) if embedder.config.normalize else ref
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
