"""Contrastive losses: open_clip's ClipLoss with local loss and gather-with-grad, the learnable
logit scale, and the gathers every method's global-batch losses use (see vla/losses/__init__.py
for the conventions)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad


def gather_features(
    a: Tensor,
    b: Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Concatenate ``a`` and ``b`` from every rank along the batch: (B, D) → (world_size·B, D).

    As open_clip's ``gather_features`` (torch.distributed path):
    - ``gather_with_grad``: an autograd all-gather, whose backward sums each rank's gradient
      for a slice into the rank that owns it — every rank's loss trains every rank's features.
    - otherwise a plain all-gather, which carries no gradient; unless ``local_loss``, the local
      slice is put back as the caller's tensor so that its own gradient still flows. (With
      ``local_loss`` the rows are the local tensors already, so open_clip leaves the gathered
      columns gradient-free; we do the same.)
    ``world_size == 1`` returns the inputs unchanged.
    """
    if world_size == 1:
        return a, b
    if gather_with_grad:
        return torch.cat(all_gather_with_grad(a), dim=0), torch.cat(all_gather_with_grad(b), dim=0)
    gathered_a = [torch.zeros_like(a) for _ in range(world_size)]
    gathered_b = [torch.zeros_like(b) for _ in range(world_size)]
    dist.all_gather(gathered_a, a.contiguous())
    dist.all_gather(gathered_b, b.contiguous())
    if not local_loss:
        gathered_a[rank] = a
        gathered_b[rank] = b
    return torch.cat(gathered_a, dim=0), torch.cat(gathered_b, dim=0)


def symmetric_cross_entropy(logits_a: Tensor, logits_b: Tensor, labels: Tensor) -> Tensor:
    """½ [CE(logits_a, labels) + CE(logits_b, labels)], each CE a mean over rows."""
    return (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch, as open_clip's ``ClipLoss``.

        L = ½ [ CE(s · I Tᵀ, y) + CE(s · T Iᵀ, y) ],   y_i = i,

    with ``I``, ``T`` the L2-normalised image and text features, ``s = exp(logit_scale)`` the
    already exponentiated (and clamped, see `LogitScale`) scale, and CE the mean over rows.

    Across ``world_size`` ranks the features are gathered (`gather_features`). Without
    ``local_loss`` each rank computes the full (N×N, N = world_size·B) logits; with it, each rank
    computes only its B rows against all N columns, with labels ``arange(B) + rank·B`` — the
    same loss in expectation at 1/world_size of the memory. With ``gather_with_grad`` and either
    mode, the mean of the ranks' losses equals the single-process loss on the concatenated
    batch, and DDP's gradient averaging yields exactly the single-process gradients.
    """

    def __init__(
        self,
        *,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device)
        if self.world_size == 1:
            logits_per_image = logit_scale * image_features @ text_features.T
            return symmetric_cross_entropy(logits_per_image, logits_per_image.T, labels)

        all_image, all_text = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
        )
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            return symmetric_cross_entropy(logits_per_image, logits_per_text, labels + batch * self.rank)
        logits_per_image = logit_scale * all_image @ all_text.T
        labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
        return symmetric_cross_entropy(logits_per_image, logits_per_image.T, labels)


class LogitScale(nn.Module):
    """The learnable contrastive scale ``s = exp(min(θ, ln(1/τ_min)))``, θ initialised at ln(1/τ₀).

    Defaults: τ₀ = 0.07 (CLIP, ProCLIP, MM-GEM) and τ_min = 0.01, i.e. ``s ≤ 100`` — CLIP's
    clamp at ln 100 and MM-GEM's "temperature lower bound 0.01" are the same bound.

    The clamp is applied in ``forward`` rather than in-place on the parameter after each
    optimiser step (open_clip's way), so that the bound holds on every path — the first step
    after a resume, an EMA copy, an evaluation — without the training loop having to remember a
    post-step hook. Consequence: while θ is above the bound its gradient is zero; only weight
    decay (which open_clip-style recipes exclude for this parameter) would move it back.
    """

    def __init__(self, init_temperature: float = 0.07, min_temperature: float = 0.01) -> None:
        super().__init__()
        if not 0 < min_temperature <= init_temperature:
            raise ValueError(
                f"need 0 < min_temperature ({min_temperature}) <= init_temperature ({init_temperature})"
            )
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.max_log_scale = math.log(1 / min_temperature)

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()


def gather_rows(x: Tensor, world_size: int, *, with_grad: bool) -> Tensor:
    """``x`` from every rank, concatenated by rank: (B, D) → (world_size·B, D). With ``with_grad``
    the all-gather's backward sums every rank's gradient into the rank that owns the rows."""
    if world_size == 1:
        return x
    if with_grad:
        return torch.cat(all_gather_with_grad(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
