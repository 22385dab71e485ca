"""DCLIP's losses: InfoNCE at a fixed temperature for the meta-teacher and the student, the
student's distillation from the teacher, and the ViT-L preservation term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vla.losses.contrastive import ClipLoss


def infonce(a: Tensor, b: Tensor, temperature: float, *, rank: int = 0, world_size: int = 1) -> Tensor:
    """Symmetric InfoNCE with a fixed temperature, over the global batch:

        L = ½ [ CE(A Bᵀ / τ, y) + CE(B Aᵀ / τ, y) ],   y_i = i,

    A, B the rows of every rank (N = world_size · B_local): under torchrun the features are
    gathered with gradients and each rank computes its own rows against all N columns, as
    open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)` does, so the negatives are the
    global batch and the mean of the ranks' losses is the one-process loss on the concatenated
    batch. DCLIP trains both its meta-teacher (teacher embedding vs frozen CLIP text embedding)
    and its student (image vs text) with τ = 0.05 and no learnable scale. The paper writes
    "InfoNCE" without a direction; we take the symmetric form, as CLIP does, so both sides are
    pulled together. Inputs are L2-normalised by the caller.
    """
    return ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)(a, b, 1.0 / temperature)


def dclip_student_loss(
    image: Tensor,
    teacher: Tensor | None,
    text: Tensor,
    temperature: float = 0.05,
    preserve: Tensor | None = None,
    preserve_weight: float = 1.0,
    distill_weight: float = 1.0,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Tensor]:
    """DCLIP's student loss:

        L = λ · mean_i (1 − cos(E_I(x_i), teacher_i)) + InfoNCE_τ(E_I(x), E_T(T))
            [+ w · mean_i (1 − cos(E_I(x_i), E_I^orig(x_i)))   — the ViT-L preservation term]

    The means are over the rank's rows (equal shares: their mean over ranks is the global
    mean); the InfoNCE gathers the global batch across `world_size` ranks (`infonce`).

    λ = ``distill_weight`` is 1 in DCLIP; λ = 0 with ``teacher=None`` is the "no teacher"
    ablation (InfoNCE only; no ``"distill"`` entry).

    ``teacher`` (the meta-teacher's embedding) and ``preserve`` (the original, frozen image
    encoder's embedding) are targets and are detached; ``text`` is not, because the public
    code's variant unfreezes the text encoder. Returns ``{"loss", "distill", "contrastive"}``
    plus ``"preserve"`` when given.
    """
    contrastive = infonce(image, text, temperature, rank=rank, world_size=world_size)
    out = {"loss": contrastive, "contrastive": contrastive}
    if teacher is not None:
        out["distill"] = (1 - F.cosine_similarity(image, teacher.detach(), dim=-1)).mean()
        out["loss"] = out["loss"] + distill_weight * out["distill"]
    if preserve is not None:
        out["preserve"] = preservation_loss(image, preserve)
        out["loss"] = out["loss"] + preserve_weight * out["preserve"]
    return out


def dclip_teacher_loss(teacher: Tensor, text: Tensor, temperature: float = 0.05, *, rank: int = 0,
                       world_size: int = 1) -> Tensor:
    """DCLIP's meta-teacher objective: symmetric InfoNCE between the teacher embedding and the
    frozen CLIP text embedding of the same caption, fixed τ = 0.05:

        L = InfoNCE_τ(norm(teacher(x, T)), norm(E_T(T)))        (see `infonce`)

    Both are L2-normalised here (the teacher's ½ z_text + ½ z_image is not); the text embedding
    is a frozen target and is detached. Negatives: the global batch over `world_size` ranks.
    """
    return infonce(F.normalize(teacher, dim=-1), F.normalize(text.detach(), dim=-1), temperature,
                   rank=rank, world_size=world_size)


def teacher_image_negatives_loss(scores: Tensor, temperature: float = 0.05) -> Tensor:
    """The meta-teacher's caption-conditioned image contrast (vla's `image_negatives` switch):
    for caption T_j, its own image x_j and M other images x_j1..x_jM of the global batch, each
    conditioned on T_j,

        s_j0 = cos(teacher(x_j, T_j), u_j),   s_jm = cos(teacher(x_jm, T_j), u_j)
        L_img = mean_j CE([s_j0, s_j1, .., s_jM] / τ, 0)

    scores: (B, 1 + M), the true image in column 0. InfoNCE alone scores every teacher output
    under its own caption, so a teacher that ignores the image meets it from the caption tokens
    (measured: the output for one caption sits at cosine 0.83 across images); this term is won
    only by reading the image, and it is the score `vla eval-teacher` retrieves with.
    """
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores / temperature, target)


def preservation_loss(image: Tensor, original: Tensor) -> Tensor:
    """DCLIP's ViT-L preservation term, keeping the student near the original image encoder:

        L_pres = mean_i (1 − cos(E_I(x_i), E_I^orig(x_i)))

    The original (frozen) embedding is a target and is detached.
    """
    return (1 - F.cosine_similarity(image, original.detach(), dim=-1)).mean()
