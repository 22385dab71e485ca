"""MM-GEM's losses: the caption loss over caption tokens, L = L_emb + L_gen, and the objective
switch (joint | embed | caption) of the ablations."""

from __future__ import annotations

import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from vla.losses.contrastive import ClipLoss


def caption_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100, *, world_size: int = 1) -> Tensor:
    """Next-token cross-entropy on caption tokens, as in MM-GEM's generation path:

        L_gen = − (1/|C|) Σ_{(b,t) ∈ C} log softmax(logits[b, t−1])[targets[b, t]],
        C = {(b, t) : t ≥ 1, targets[b, t] ≠ ignore_index}

    ``logits`` (B, L, V) are the LM's outputs over the input ``[V_in, [CAP], caption]``;
    ``targets`` (B, L) are aligned with the *inputs* (position t holds token t, or
    ``ignore_index`` for the visual prefix, the [CAP] token and padding). The shift happens here:
    position t−1 predicts token t. The mean is over caption tokens of the whole batch, not per
    sequence, so long captions weigh by their length (as HF causal LMs and open_clip's CoCa do).

    "The whole batch" is the global batch at any rank count: under torchrun, C is every rank's
    caption tokens, so rank r returns ``world_size · Σ_{C_r} (−log p) / |C|`` with |C| summed over
    ranks (a count, no gradient). The mean over ranks, and DDP's averaged gradient, are then one
    process's on the global batch; a per-rank mean would weigh a rank's tokens by how few it had.
    """
    vocab = logits.shape[-1]
    flat_logits, flat_targets = logits[:, :-1].reshape(-1, vocab), targets[:, 1:].reshape(-1)
    if world_size == 1:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index)
    total = (flat_targets != ignore_index).sum().float()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    summed = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction="sum")
    return world_size * summed / total.clamp_min(1)


def mmgem_loss(
    image: Tensor,
    text: Tensor,
    logit_scale: Tensor,
    logits: Tensor,
    targets: Tensor,
    contrastive: ClipLoss | None = None,
    ignore_index: int = -100,
    emb_weight: float = 1.0,
    gen_weight: float = 1.0,
) -> dict[str, Tensor]:
    """MM-GEM's joint objective, both paths on the same batch:

        L = w_emb · L_emb + w_gen · L_gen,   L_emb = ClipLoss(v, t, s) = ½[CE_v→t + CE_t→v],
        L_gen = caption_loss(logits, targets)

    The paper's L is unweighted with L_emb the *sum* of the two directions (CE_v→t + CE_t→v):
    w_emb = 2, w_gen = 1; w_emb = 1 is the mean of the directions (open_clip's ClipLoss).
    ``contrastive`` is the (possibly distributed) `ClipLoss` to use; single-process by default.
    Returns ``{"loss", "emb", "gen"}``, ``emb`` and ``gen`` unweighted (``emb`` the directions' mean).
    """
    emb = (contrastive or ClipLoss())(image, text, logit_scale)
    gen = caption_loss(logits, targets, ignore_index=ignore_index, world_size=_world_size(contrastive))
    return {"loss": emb_weight * emb + gen_weight * gen, "emb": emb, "gen": gen}


def _world_size(contrastive: ClipLoss | None) -> int:
    """The rank count MM-GEM's losses run over: the contrastive loss's (1 without one)."""
    return contrastive.world_size if contrastive is not None else 1


#: MM-GEM's recipe switch: both paths (the method), or one alone (the paper's same-budget ablation)
MMGEM_OBJECTIVES = ("joint", "embed", "caption")


def mmgem_objective_loss(
    objective: str,
    *,
    image: Tensor | None = None,
    text: Tensor | None = None,
    logit_scale: Tensor | None = None,
    logits: Tensor | None = None,
    targets: Tensor | None = None,
    contrastive: ClipLoss | None = None,
    ignore_index: int = -100,
    emb_weight: float = 1.0,
    gen_weight: float = 1.0,
) -> dict[str, Tensor]:
    """MM-GEM's loss under the recipe's ``objective``:

        joint:    L = w_emb · L_emb + w_gen · L_gen     (`mmgem_loss`; the paper: w_emb = 2, w_gen = 1)
        embed:    L = w_emb · L_emb                     (CLIP-only ablation)
        caption:  L = w_gen · L_gen                     (caption-only ablation)

    with L_emb = ClipLoss(v, t, s), s = exp(min(θ, ln 100)) from `LogitScale` (τ₀ = 0.07,
    τ ≥ 0.01), and L_gen = `caption_loss` (next-token CE on caption tokens only). Only the
    inputs the objective needs are required, so an ablation run skips the other path's compute.
    Returns ``{"loss"}`` plus the terms computed (``"emb"``, ``"gen"``).
    """
    if objective not in MMGEM_OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {', '.join(MMGEM_OBJECTIVES)}")
    needs_emb, needs_gen = objective != "caption", objective != "embed"
    if needs_emb and (image is None or text is None or logit_scale is None):
        raise ValueError(f"objective {objective!r} needs image, text and logit_scale")
    if needs_gen and (logits is None or targets is None):
        raise ValueError(f"objective {objective!r} needs logits and targets")
    if objective == "joint":
        return mmgem_loss(
            image, text, logit_scale, logits, targets, contrastive, ignore_index,  # type: ignore[arg-type]
            emb_weight=emb_weight, gen_weight=gen_weight,
        )
    if objective == "embed":
        emb = (contrastive or ClipLoss())(image, text, logit_scale)
        return {"loss": emb_weight * emb, "emb": emb}
    gen = caption_loss(logits, targets, ignore_index=ignore_index,  # type: ignore[arg-type]
                       world_size=_world_size(contrastive))
    return {"loss": gen_weight * gen, "gen": gen}
