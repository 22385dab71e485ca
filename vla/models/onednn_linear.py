"""fp32 linear layers on the CPU through oneDNN's matmul instead of torch's default BLAS (MKL).

On the CPU, `F.linear` in fp32 is an MKL sgemm. oneDNN (torch's other CPU math library, the one
behind its convolutions) has its own fp32 matmul, reached from Python as
`torch.ops.mkldnn._linear_pointwise` (what inductor emits for CPU linears). On the development
machine (AMD EPYC, AVX-512) MKL's sgemm ran at ~195 GFLOP/s on 2 cores and oneDNN's at ~430-460
(`brg_matmul:avx512_core` in its verbose log), for every shape of part a's model; MKL chooses
its code path by CPU vendor, oneDNN by the instruction sets it finds. The same product in fp32
either way: the two differ only in summation order, i.e. within float rounding, like any two
BLAS builds.

`onednn_linear(model)` gives each plain `nn.Linear` of `model` a forward that computes
`x Wᵀ + b` with oneDNN, and records on each `nn.MultiheadAttention` the linear its fast forward
(`vla.models.attention`) should use. The backward is oneDNN too:

    ∂L/∂x = g W          (oneDNN, W read through a transposed view)
    ∂L/∂W = gᵀ x         (oneDNN, computed as whichever of gᵀx or (xᵀg)ᵀ puts the smaller of
                          in/out features on the rows: ~1.6x faster than the other way here)
    ∂L/∂b = Σ_rows g

where g is ∂L/∂y flattened to rows. The training loop patches the models it trains
(`train.cpu_matmul`); `onednn_linears(model)` patches a frozen model for one block and undoes it
after, which is how every `encode_*` (`vla.models.encoder.inference`) and the text embedder's
`embed` (the feature cache's encoder) run on the CPU. A call the oneDNN path does not cover (not CPU, not fp32,
autocast on, an empty batch, a torch without oneDNN) goes to `F.linear`. A subclass of
`nn.Linear` with its own forward (LoRA, quantised layers) is left alone. Parameters, state dicts
and checkpoints are unchanged.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from vla.errors import UserError

BACKENDS = ("auto", "onednn", "blas")


def available() -> bool:
    """Whether this torch can run the oneDNN path at all."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ bᵀ + bias in oneDNN (a: rows × k, b: n × k, either may be a strided view)."""
    if torch.compiler.is_compiling():
        # inductor lowers mkldnn's op only for frozen (constant) weights: an opaque op instead
        return _compiled_mm_t(a, b, bias)
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@torch.library.custom_op("vla::onednn_mm_t", mutates_args=())
def _compiled_mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


@_compiled_mm_t.register_fake
def _(a, b, bias):
    return a.new_empty(a.shape[0], b.shape[0])


def weight_grad(g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """∂L/∂W = gᵀ x (out × in) in oneDNN, from g (rows × out) and x (rows × in): computed as gᵀx or
    (xᵀg)ᵀ, whichever puts the smaller of out/in on the product's rows (~1.6× faster here)."""
    if g.shape[1] <= rows.shape[1]:
        return _mm_t(g.t(), rows.t())
    return _mm_t(rows.t(), g.t()).t().contiguous()


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        y = _mm_t(rows, weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        if not g.is_contiguous():
            g = g.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm_t(g, weight.t()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            gw = weight_grad(g, rows)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN where the call is fp32 on the CPU."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or (bias is not None and bias.dtype != torch.float32) or x.numel() == 0
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, module.weight, module.bias)


def onednn_linear(model: nn.Module) -> int:
    """Route `model`'s plain `nn.Linear` layers and its self-attention projections through
    oneDNN (bound per module, so a deep copy keeps them); returns how many modules were given it,
    0 where this torch has no oneDNN."""
    if not available():
        return 0
    n = 0
    # an attention's out_proj is read as a weight by the attention's forward, never called
    inside = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.MultiheadAttention):
            module._vla_linear = linear  # read by vla.models.attention's fast forward
            n += 1
        elif isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            module.forward = types.MethodType(_linear_forward, module)
            n += 1
    return n


def use_onednn(backend: str, device: torch.device) -> bool:
    """Whether the loop's `train.cpu_matmul` (one of BACKENDS, checked by TrainConfig) asks for
    oneDNN on `device` ("auto": on the CPU whenever this torch has it; "blas": torch's default)."""
    if backend == "onednn" and not available():
        raise UserError("train.cpu_matmul=onednn: this torch is built without oneDNN; "
                        "set train.cpu_matmul=auto or blas")
    return backend != "blas" and device.type == "cpu" and available()


@contextlib.contextmanager
def onednn_linears(model: torch.nn.Module | None) -> Iterator[None]:
    """`onednn_linear(model)` for the block only, for a frozen model encoding on the CPU (the feature
    cache): what the block patched is restored after it, what was patched before stays."""
    if model is None or not available() or next(model.parameters(), torch.empty(0)).device.type != "cpu":
        yield
        return
    before = {id(m) for m in model.modules() if "forward" in vars(m) or "_vla_linear" in vars(m)}
    onednn_linear(model)
    try:
        yield
    finally:
        for m in model.modules():
            if id(m) not in before:
                vars(m).pop("forward", None)
                vars(m).pop("_vla_linear", None)
