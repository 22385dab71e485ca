"""Zero-shot classification with a template ensemble, as CLIP_benchmark (and open_clip) do it.

Classifier: for class c, w_c = normalize(mean_t normalize(E_T(template_t filled with c))), one
`encode_text` call per class over its templates, stacked as CLIP_benchmark's [D, C] matrix.
Logits: 100 · image_emb @ W.

- `acc1`, `acc5`: fraction of images whose class is among the 1 / 5 highest logits; `acc5` is NaN
  when there are fewer than 5 classes (CLIP_benchmark reports it only for C ≥ 5).
- `mean_per_class_recall`: balanced accuracy, mean over the classes present in `labels` of
  (#images of the class predicted as it / #images of the class), as sklearn's
  `balanced_accuracy_score(target, argmax)` that CLIP_benchmark calls.

Ties (a class whose logit equals the true class's), by mode (`retrieval.MODES`):
- `clip_benchmark` (default): CLIP_benchmark's own calls, `logits.topk(5, 1, True, True)` for
  acc1/acc5 and `logits.argmax(1)` for the per-class recall, so `topk`'s and `argmax`'s order
  among equal logits decides, as there. (The two may disagree on a tied image, as there.)
- `pessimistic`: a tie counts against the model: "in the top K" means fewer than K other classes
  with a logit ≥ the true one's.
- `expected`: the expectation over a random order among tied classes: with g classes above the
  true one and e tied with it, P(top K) = clamp(K − g, 0, e + 1) / (e + 1).
Every mode reports `ties`: how many images had another class tied with their true class.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from vla.evaluate.retrieval import check_mode, hit_probability

PLACEHOLDER = "{c}"


def fill_template(template: str, classname: str) -> str:
    """`template` with `{c}` replaced by the class name (CLIP_benchmark's `template.format(c=...)`,
    without tripping over other braces in the template)."""
    return template.replace(PLACEHOLDER, classname)


@torch.no_grad()
def zeroshot_classifier(encode_text: Callable[[Sequence[str]], torch.Tensor],
                        classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, D] class weights: the renormalised mean of the normalised template embeddings.

    Computed as CLIP_benchmark does, so the weights are the same bits: one batch per class,
    `normalize(...).mean(0)`, then division by its norm."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    weights = []
    for classname in classnames:
        emb = encode_text([fill_template(t, classname) for t in templates]).float()
        w = F.normalize(emb, dim=-1).mean(dim=0)
        weights.append(w / w.norm())
    return torch.stack(weights, dim=1).T  # a view of CLIP_benchmark's [D, C] matrix


@torch.no_grad()
def zeroshot_logits(image_emb: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """[N, C] = 100 · image_emb @ W with W = classifier.T as CLIP_benchmark lays it out ([D, C])."""
    return 100.0 * image_emb @ classifier.T.contiguous()


@torch.no_grad()
def true_class_counts(logits: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g, e), each [N]: classes with a logit above / tied with the true class's."""
    true = logits.gather(1, labels[:, None])
    return ((logits > true).sum(1).cpu(), ((logits == true).sum(1) - 1).cpu())


def zeroshot_metrics(image_emb: torch.Tensor, labels, classifier: torch.Tensor,
                     mode: str = "clip_benchmark") -> dict[str, float]:
    """`acc1`, `acc5` (NaN under 5 classes), `mean_per_class_recall` and `ties` — see the
    module doc. `classifier` is [C, D] as `zeroshot_classifier` returns it."""
    check_mode(mode)
    labels = torch.as_tensor(labels, dtype=torch.long, device=image_emb.device)
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be [N={image_emb.shape[0]}], got {tuple(labels.shape)}")
    n_classes = classifier.shape[0]
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes})")
    logits = zeroshot_logits(image_emb, classifier).float().cpu()
    labels = labels.cpu()
    above, tied = true_class_counts(logits, labels)
    ks = (1, 5) if n_classes >= 5 else (1,)
    if mode == "clip_benchmark":
        # CLIP_benchmark's `accuracy` and `pred = logits.argmax(axis=1)`
        pred = logits.topk(max(ks), 1, True, True)[1]
        top = {k: (pred[:, :k] == labels[:, None]).any(1).double() for k in ks}
        correct = (logits.argmax(axis=1) == labels).double()
    else:
        ones = torch.ones_like(above)
        top = {k: hit_probability(above, tied, ones, k, mode) for k in ks}
        correct = top[1]
    # balanced accuracy over the classes that occur: sums of hits and counts per label
    hits = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=n_classes).double()
    present = counts > 0
    return {
        "acc1": top[1].mean().item(),
        "acc5": top[5].mean().item() if 5 in top else float("nan"),
        "mean_per_class_recall": (hits[present] / counts[present]).mean().item(),
        "ties": int((tied > 0).sum()),
    }
