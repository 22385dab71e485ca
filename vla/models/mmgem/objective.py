"""What the training loop trains for MM-GEM's two stages: the model, its loss, run-long counts.

`MMGEMTrainer` wraps an `MMGEM` so that one forward call (which DDP needs to see) gives the
stage's loss, from `vla.losses.mmgem_objective_loss`:

    joint:    L = w_emb·L_emb + w_gen·L_gen    embed: L = w_emb·L_emb    caption: L = w_gen·L_gen
    (+ w_gen·L_gen_img with stage 2's image captions: L_gen of the image's own caption from
    [V_in = h3(h1(MeanPool(V))), [CAP]])

with image-level pairs in stage 1 (v = h1(MeanPool(V))) and region pairs in stage 2
(h4(h1(RoIAlign(V, R))) against the region caption's t; V_in = h3(h1(RoIAlign(V, R))) before
the soft prompts). It also counts, as buffers — so a checkpoint carries them and a resumed run
reports whole-run totals — the captions trained on and those cut at ``max_text_tokens``.

`learning_rate_groups` gives the loop's optimizer groups: projections at the recipe's lr,
backbones (vision tower, LM) at ``backbone_lr_scale`` × lr (the paper: 5e-4 vs 5e-5), each split
by open_clip's weight-decay rule.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from vla.losses import ClipLoss, caption_loss, mmgem_objective_loss
from vla.models.mmgem import MMGEM
from vla.optim import no_weight_decay

COUNTERS = ("captions", "truncated")
_LOSS_INPUTS = ("image", "text", "logit_scale", "logits", "targets")


class MMGEMTrainer(nn.Module):
    def __init__(self, model: MMGEM, objective: str, contrastive: ClipLoss, *, emb_weight: float = 1.0,
                 gen_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.contrastive = contrastive
        self.emb_weight, self.gen_weight = emb_weight, gen_weight
        self.register_buffer("counts", torch.zeros(len(COUNTERS), dtype=torch.long))

    def forward(self, pixels: Tensor, captions: Sequence[str], boxes: Sequence[Tensor] | None = None,
                image_captions: Sequence[str] | None = None) -> dict[str, Tensor]:
        out = self.model(pixels, captions, objective=self.objective, boxes=boxes)
        losses = mmgem_objective_loss(self.objective, contrastive=self.contrastive, emb_weight=self.emb_weight,
                                      gen_weight=self.gen_weight,
                                      **{k: out[k] for k in _LOSS_INPUTS if k in out})
        if image_captions is not None:  # stage 2's image captions: stage 1's image path, [CAP]
            img = self.model(pixels, image_captions, objective="caption", soft_prompts=False)
            losses["gen_img"] = caption_loss(img["logits"], img["targets"])
            losses["loss"] = losses["loss"] + self.gen_weight * losses["gen_img"]
        counted = torch.tensor([len(captions), out["truncated"]], device=self.counts.device)
        with torch.no_grad():
            # every rank adds the global count, so DDP's buffer broadcast from rank 0 changes nothing
            self.counts += _all_reduce_sum(counted)
        report = {k: v.detach() for k, v in losses.items() if k != "loss"}
        if "logit_scale" in out and self.objective != "caption":
            report["logit_scale"] = out["logit_scale"].detach()
        return {"loss": losses["loss"], **report}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """`train.grad_checkpointing`: recompute activations in the backward pass instead of keeping
        them — the vision tower's blocks (open_clip's ``set_grad_checkpointing``) and the LM's
        decoder layers (transformers' ``gradient_checkpointing_enable``, non-reentrant). Same loss
        and gradients (tested), less activation memory, about one more forward of compute."""
        self.model.set_grad_checkpointing(enable)

    def counted(self) -> dict[str, int]:
        return dict(zip(COUNTERS, (int(v) for v in self.counts.tolist())))


def _all_reduce_sum(x: Tensor) -> Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def learning_rate_groups(trainer: nn.Module, groups: dict[str, list[nn.Parameter]], weight_decay: float,
                         lr_scales: dict[str, float]) -> list[dict[str, Any]]:
    """Optimizer groups: each of `groups` (name → parameters, from `MMGEM.trainable_parameters`)
    at its ``lr_scales[name]``, split into decayed and non-decayed tensors by open_clip's rule."""
    names = {id(p): n for n, p in trainer.named_parameters()}
    out = []
    for group, params in groups.items():
        decay = [p for p in params if not no_weight_decay(names.get(id(p), ""), p)]
        keep = [p for p in params if no_weight_decay(names.get(id(p), ""), p)]
        for ps, wd in ((keep, 0.0), (decay, weight_decay)):
            if ps:
                out.append({"params": ps, "weight_decay": wd, "lr_scale": lr_scales[group], "name": group})
    return out


def optimizer_record(train_cfg: Any) -> dict[str, Any]:
    """What the manifest says about the optimizer, and how it departs from the paper (LAMB, wd 0.05)."""
    record: dict[str, Any] = {"name": train_cfg.optimizer, "weight_decay": train_cfg.weight_decay}
    if train_cfg.optimizer == "lamb":
        import timm

        record["implementation"] = f"timm.optim.Lamb (timm {timm.__version__})"
    deviations = []
    if train_cfg.optimizer != "lamb":
        deviations.append(f"{train_cfg.optimizer} instead of the paper's LAMB")
    if train_cfg.weight_decay != 0.05:
        deviations.append(f"weight decay {train_cfg.weight_decay:g} instead of the paper's 0.05")
    record["deviation_from_paper"] = "; ".join(deviations) or None
    return record


def objective_gradient_norms(trainer: MMGEMTrainer, pixels: Tensor, captions: Sequence[str],
                             groups: dict[str, list[nn.Parameter]]) -> dict[str, Any]:
    """Claim (a)'s evidence on one batch: per parameter group, the norm of each objective's
    gradient as it enters L (w_emb·∇L_emb, w_gen·∇L_gen; L_emb single-process) and the cosine
    between them. ``torch.autograd.grad`` leaves the parameters' ``.grad`` (and DDP) untouched."""
    out = trainer.model(pixels, captions, objective="joint")
    emb = trainer.emb_weight * ClipLoss()(out["image"], out["text"], out["logit_scale"])
    gen = trainer.gen_weight * caption_loss(out["logits"], out["targets"])
    names = list(groups)
    params = [p for n in names for p in groups[n]]
    grads = {}
    for term, loss in (("emb", emb), ("gen", gen)):
        grads[term] = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=term == "emb")
    record: dict[str, Any] = {"emb_loss": float(emb.detach()), "gen_loss": float(gen.detach()), "groups": {}}
    start = 0
    for n in names:
        k = len(groups[n])
        flat = {term: torch.cat([(g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                                 for g, p in zip(grads[term][start:start + k], groups[n])])
                for term in grads} if k else None
        start += k
        if flat is None:
            continue
        a, b = flat["emb"], flat["gen"]
        cos = float(a @ b / (a.norm() * b.norm())) if a.norm() > 0 and b.norm() > 0 else None
        record["groups"][n] = {"emb_grad_norm": float(a.norm()), "gen_grad_norm": float(b.norm()), "cosine": cos}
    return record
