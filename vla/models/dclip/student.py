"""DCLIP's student: the CLIP's image tower alone, what `vla train-student` trains (the text tower
stays frozen and out of the optimizer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImageStudent(nn.Module):
    """What train-student trains: the CLIP's image tower alone (so the optimizer never holds
    the text tower's weights)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """`train.grad_checkpointing`: open_clip's activation checkpointing of the tower's blocks."""
        self.visual.set_grad_checkpointing(enable)
