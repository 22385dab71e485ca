"""ProCLIP's losses: stage 1's instance and structure alignment (distill) and stage 2's
self-distillation against the EMA teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vla.losses.contrastive import gather_rows


def instance_alignment_loss(student: Tensor, teacher: Tensor, *, world_size: int = 1) -> Tensor:
    """ProCLIP's instance semantic alignment ``L_ins = Σ_i ‖s_i − u_i‖²``.

    A sum over the batch and the dimensions (official code: ``mse_loss(reduction='sum')``), so
    it grows with B; the recipe's learning rate is tuned with that in mind. The teacher ``u`` is
    a target and is detached.

    The sum is over the *global* batch at any rank count: rank r returns
    ``world_size · Σ_{i ∈ rank r} ‖s_i − u_i‖²``, so that the mean over ranks (what the loop logs,
    and what DDP's gradient average differentiates) is ``Σ_{i ∈ global batch}``, the value one
    process computes on the whole batch. (The official code's per-GPU sum would shrink the term,
    and the learning rate's meaning, by the number of GPUs.)
    """
    return world_size * F.mse_loss(student, teacher.detach(), reduction="sum")


def structure_alignment_loss(student: Tensor, teacher: Tensor, beta: float = 1.0, *, rank: int = 0,
                             world_size: int = 1) -> Tensor:
    """ProCLIP's embedding structure alignment:

        L_struct = Σ_{i<j} smoothL1(‖s_i − s_j‖, ‖u_i − u_j‖)

    Pairwise Euclidean distances within the batch (``torch.pdist``: the B(B−1)/2 pairs i<j), not
    similarity matrices; sum reduction as the official code (``smooth_l1_loss(reduction='sum')``,
    which is unambiguous there). ``smoothL1(x, y) = ½(x−y)²/β`` if ``|x−y| < β`` else
    ``|x−y| − ½β``, with torch's default β = 1. The teacher is detached.

    The pairs are those of the *global* batch at any rank count (per GPU, the official code's
    pairs within a GPU's batch would be ~1/world_size of them, and the term's weight against
    ``L_ins`` would fall with the GPU count). Under torchrun rank r gathers every rank's features
    (the student's with gradient) and sums over its own rows i against all columns j ≠ i:

        L_r = world_size · ½ Σ_{i ∈ rank r} Σ_{j ≠ i} smoothL1(‖s_i − s_j‖, ‖u_i − u_j‖)

    whose mean over ranks is the single-process L_struct on the global batch, and whose gradient,
    averaged by DDP, is its gradient.
    """
    if world_size == 1:
        return F.smooth_l1_loss(
            F.pdist(student, p=2), F.pdist(teacher.detach(), p=2), reduction="sum", beta=beta
        )
    teacher = teacher.detach()
    every_s = gather_rows(student, world_size, with_grad=True)
    every_t = gather_rows(teacher, world_size, with_grad=False)
    exact = "donot_use_mm_for_euclid_dist"  # a pair's distance as pdist computes it
    d_s = torch.cdist(student, every_s, compute_mode=exact)
    d_t = torch.cdist(teacher, every_t, compute_mode=exact)
    b = student.shape[0]
    others = torch.ones_like(d_s, dtype=torch.bool)
    others[torch.arange(b), rank * b + torch.arange(b)] = False  # i ≠ j
    pairs = F.smooth_l1_loss(d_s[others], d_t[others], reduction="sum", beta=beta)
    return world_size * pairs / 2


def distill_loss(
    student: Tensor,
    teacher: Tensor,
    student2: Tensor | None = None,
    teacher2: Tensor | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """ProCLIP stage 1: ``L_dis = L_ins + L_struct``.

        L_ins    = Σ_i ‖s_i − u_i‖²  (+ Σ_i ‖s'_i − u'_i‖² for a second text variant s', u')
        L_struct = Σ_{i<j} smoothL1(‖s_i − s_j‖, ‖u_i − u_j‖)   (first variant only)

    As the official code: the instance term covers both text variants (short caption and a
    perturbed text), the structure term the short captions only. Both sums run over the global
    batch at any rank count (see `instance_alignment_loss`, `structure_alignment_loss`).
    Returns ``{"loss", "ins", "struct"}``.
    """
    if (student2 is None) != (teacher2 is None):
        raise ValueError("give both student2 and teacher2, or neither")
    ins = instance_alignment_loss(student, teacher, world_size=world_size)
    if student2 is not None and teacher2 is not None:
        ins = ins + instance_alignment_loss(student2, teacher2, world_size=world_size)
    struct = structure_alignment_loss(student, teacher, rank=rank, world_size=world_size)
    return {"loss": ins + struct, "ins": ins, "struct": struct}


def self_distillation_loss(image: Tensor, image_teacher: Tensor, *, rank: int = 0,
                           world_size: int = 1) -> dict[str, Tensor]:
    """ProCLIP stage 2's regulariser ``L_reg`` on image embeddings against a teacher image encoder:

        L_reg = Σ_i ‖z_i − z^t_i‖² + Σ_{i<j} smoothL1(‖z_i − z_j‖, ‖z^t_i − z^t_j‖),
        z = E_I(x) (student),  z^t = E_I^t(x) (teacher)

    The same two terms as stage 1 (sum reductions, over the global batch at any rank count, so
    that λ in ``L_info + λ·L_reg`` weighs the same term on one GPU or eight), the teacher being
    an EMA or frozen copy of the student. Returns ``{"loss", "ins", "struct"}``.
    """
    ins = instance_alignment_loss(image, image_teacher, world_size=world_size)
    struct = structure_alignment_loss(image, image_teacher, rank=rank, world_size=world_size)
    return {"loss": ins + struct, "ins": ins, "struct": struct}
