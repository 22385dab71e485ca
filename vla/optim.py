"""AdamW (or LAMB) with open_clip's weight-decay split, and the learning-rate schedule.

The schedule is a plain function of the step (no LRScheduler object), so resuming needs nothing
but the step number: the loop sets every group's lr from `lr_at(step)` before each optimizer step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vla.errors import UserError


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip's rule: gains, biases, norms and the logit scale are not decayed.

    Decaying a LayerNorm gain or the temperature pulls them towards 0, which is never what we
    want; every 1-d tensor (norm weights, biases, scalars) is excluded by `ndim < 2` alone, the name
    tests catch the odd 2-d one.
    """
    return (
        param.ndim < 2
        or "bn" in name
        or "ln" in name
        or "bias" in name
        or "logit_scale" in name
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters (requires_grad) split into a decayed and a non-decayed group."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    groups = [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    groups: list[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    fused: bool = True,
    name: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW (or ``name="lamb"``) over `groups`; a group may carry `lr_scale` (default 1) to train
    slower or faster.

    A group without `weight_decay` gets the default. `lr_scale` stays in the group (and so in the
    optimizer's state dict), which is what lets the loop rescale every group per step.
    LAMB is timm's maintained `timm.optim.Lamb` (timm comes with open_clip): the Adam update plus
    weight decay, scaled per tensor by the trust ratio ‖w‖/‖update‖ (You et al. 2019). Its own
    gradient clipping is off: the loop clips (`grad_clip`).

    `fused`: AdamW's update as one kernel over all tensors (CPU and CUDA) instead of a Python loop
    of per-tensor ops (torch's default on the CPU, and open_clip's): the same update, elementwise,
    within float rounding; on the CPU several times faster for a model whose token embedding
    (dense gradients, 49k × width) is most of its parameters. Off for a device without the kernel.
    """
    groups = [dict(g) for g in groups if list(g["params"])]
    if not groups:
        raise UserError("nothing to train: every parameter has requires_grad=False")
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    if name == "lamb":
        return lamb_class()(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            max_grad_norm=None)
    if name != "adamw":
        raise UserError(f"unknown optimizer {name!r}: use 'adamw' or 'lamb'")
    params = [p for g in groups for p in g["params"]]
    fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused or None
    )


def lamb_class() -> type[torch.optim.Optimizer]:
    """timm's LAMB; a UserError naming the fix when timm is not installed."""
    try:
        from timm.optim import Lamb
    except ImportError:
        raise UserError("train.optimizer=lamb needs timm (pip install timm); or set train.optimizer=adamw") from None
    return Lamb


def lr_at(
    step: int,
    *,
    lr: float,
    steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_lr: float = 0.0,
) -> float:
    """Learning rate for the 0-based optimizer step `step` (as open_clip's scheduler.py).

    warmup (step < W):  lr * (step + 1) / W
    cosine:             min_lr + (lr - min_lr) * (1 + cos(pi * (step - W) / (steps - W))) / 2
    constant:           lr
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise UserError(f"unknown schedule {schedule!r}: use 'cosine' or 'constant'")
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` times its `lr_scale`."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
