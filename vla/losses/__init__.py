"""Every loss vla trains with, each with its formula in the docstring.

Conventions: embeddings that enter a loss are L2-normalised by the caller (docs/methods.md), ``B`` is
the local batch, and a loss that has several terms returns a dict with ``"loss"`` (what to
backpropagate) and each term by name (for logging). Targets that come from a frozen or
teacher model are detached here, so a caller can never train through a target by accident.

- Contrastive (ProCLIP stage 2, LLM2CLIP, MM-GEM): `ClipLoss`, `LogitScale`, `gather_features`.
- ProCLIP: `instance_alignment_loss`, `structure_alignment_loss`, `distill_loss`,
  `self_distillation_loss`.
- DCLIP: `infonce`, `dclip_teacher_loss`, `dclip_student_loss`, `preservation_loss`.
- MM-GEM: `caption_loss`, `mmgem_loss`, `mmgem_objective_loss`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

# ---------------------------------------------------------------------------------------------
# Contrastive: open_clip's ClipLoss with local loss and gather-with-grad
# ---------------------------------------------------------------------------------------------


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


def _symmetric_cross_entropy(logits_a: Tensor, logits_b: Tensor, labels: Tensor) -> Tensor:
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
            return _symmetric_cross_entropy(logits_per_image, logits_per_image.T, labels)

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
            return _symmetric_cross_entropy(logits_per_image, logits_per_text, labels + batch * self.rank)
        logits_per_image = logit_scale * all_image @ all_text.T
        labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
        return _symmetric_cross_entropy(logits_per_image, logits_per_image.T, labels)


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


# ---------------------------------------------------------------------------------------------
# ProCLIP
# ---------------------------------------------------------------------------------------------


def _gather_rows(x: Tensor, world_size: int, *, with_grad: bool) -> Tensor:
    """``x`` from every rank, concatenated by rank: (B, D) → (world_size·B, D). With ``with_grad``
    the all-gather's backward sums every rank's gradient into the rank that owns the rows."""
    if world_size == 1:
        return x
    if with_grad:
        return torch.cat(all_gather_with_grad(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


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
    every_s = _gather_rows(student, world_size, with_grad=True)
    every_t = _gather_rows(teacher, world_size, with_grad=False)
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


# ---------------------------------------------------------------------------------------------
# DCLIP
# ---------------------------------------------------------------------------------------------


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


def preservation_loss(image: Tensor, original: Tensor) -> Tensor:
    """DCLIP's ViT-L preservation term, keeping the student near the original image encoder:

        L_pres = mean_i (1 − cos(E_I(x_i), E_I^orig(x_i)))

    The original (frozen) embedding is a target and is detached.
    """
    return (1 - F.cosine_similarity(image, original.detach(), dim=-1)).mean()


# ---------------------------------------------------------------------------------------------
# MM-GEM
# ---------------------------------------------------------------------------------------------


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
