"""Exponential-moving-average teachers (ProCLIP stage 2's self-distillation target).

    θ_t ← m · θ_t + (1 − m) · θ_s      for every parameter; buffers are copied from the student.

The paper's figure makes the teacher an EMA of the student; the official code uses a frozen
copy. Both are one code path here: momentum 1.0 leaves the teacher exactly as it was made.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_teacher(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that never trains: no gradients, eval mode (dropout off)."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``θ_t ← m·θ_t + (1−m)·θ_s`` for parameters, buffers copied; ``m = 1`` changes nothing.

    At ``m = 1`` buffers are left alone too: a frozen copy must keep, e.g., its own BatchNorm
    statistics.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    if momentum == 1.0:
        return
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        raise ValueError("EMA teacher and student have different parameters")
    for name, param in teacher_params.items():
        # lerp(θ_t, θ_s, 1−m) = θ_t + (1−m)(θ_s − θ_t) = m·θ_t + (1−m)·θ_s
        param.lerp_(student_params[name].detach(), 1.0 - momentum)
    student_buffers = dict(student.named_buffers())
    for name, buffer in teacher.named_buffers():
        buffer.copy_(student_buffers[name])


class EMA:
    """An EMA teacher of a student model: ``EMA(student, 0.999)``, then ``.update(student)`` per step."""

    def __init__(self, student: nn.Module, momentum: float) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.teacher = make_ema_teacher(student)

    def update(self, student: nn.Module) -> None:
        ema_update(self.teacher, student, self.momentum)
