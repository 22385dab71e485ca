"""Zero-shot classification with a template ensemble, as CLIP_benchmark (and open_clip) do it.

Classifier: for class c, w_c = normalize(mean_t normalize(E_T(template_t filled with c))).
Logits: 100 · image_emb @ W.T.

- `acc1`, `acc5`: fraction of images whose class is among the 1 / 5 highest logits; `acc5` is NaN
  when there are fewer than 5 classes (CLIP_benchmark reports it only for C ≥ 5).
- `mean_per_class_recall`: balanced accuracy, mean over the classes present in `labels` of
  (#images of the class predicted as it / #images of the class), as sklearn's
  `balanced_accuracy_score(target, argmax)` that CLIP_benchmark calls.

Ties count against the model (CLIP_benchmark's `topk`/`argmax` break them arbitrarily): the rank
of the true class is the number of other classes with a logit ≥ its own, and "in the top K" means
rank < K. Without ties the numbers are CLIP_benchmark's.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

PLACEHOLDER = "{c}"


def fill_template(template: str, classname: str) -> str:
    """`template` with `{c}` replaced by the class name (CLIP_benchmark's `template.format(c=...)`,
    without tripping over other braces in the template)."""
    return template.replace(PLACEHOLDER, classname)


@torch.no_grad()
def zeroshot_classifier(encode_text: Callable[[Sequence[str]], torch.Tensor],
                        classnames: Sequence[str], templates: Sequence[str],
                        batch: int = 256) -> torch.Tensor:
    """[C, D] class weights: the renormalised mean of the normalised template embeddings."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    texts = [fill_template(t, c) for c in classnames for t in templates]
    emb = torch.cat([encode_text(texts[i:i + batch]) for i in range(0, len(texts), batch)])
    emb = F.normalize(emb.float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


@torch.no_grad()
def true_class_ranks(image_emb: torch.Tensor, labels, classifier: torch.Tensor,
                     chunk: int = 4096) -> torch.Tensor:
    """[N] pessimistic 0-based rank of each image's true class among the C classes."""
    labels = torch.as_tensor(labels, dtype=torch.long, device=image_emb.device)
    if labels.shape != (image_emb.shape[0],):
        raise ValueError(f"labels must be [N={image_emb.shape[0]}], got {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classifier.shape[0]):
        raise ValueError(f"labels must lie in [0, {classifier.shape[0]})")
    ranks = torch.empty(len(labels), dtype=torch.long)
    for start in range(0, len(labels), chunk):
        logits = 100.0 * image_emb[start:start + chunk] @ classifier.T      # [c, C]
        true = logits.gather(1, labels[start:start + chunk, None])
        ranks[start:start + chunk] = ((logits >= true).sum(1) - 1).cpu()   # minus the class itself
    return ranks


def zeroshot_metrics(image_emb: torch.Tensor, labels, classifier: torch.Tensor) -> dict[str, float]:
    """`acc1`, `acc5` (NaN under 5 classes) and `mean_per_class_recall` — see the module doc."""
    ranks = true_class_ranks(image_emb, labels, classifier)
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    correct = (ranks == 0).double()  # float64: fractions print as 0.0333…, not 0.03333333507
    n_classes = classifier.shape[0]
    # per-class recall over the classes that occur: sums of hits and counts per label
    hits = torch.zeros(n_classes, dtype=torch.float64).index_add_(0, labels, correct)
    counts = torch.bincount(labels, minlength=n_classes).double()
    present = counts > 0
    return {
        "acc1": correct.mean().item(),
        "acc5": (ranks < 5).double().mean().item() if n_classes >= 5 else float("nan"),
        "mean_per_class_recall": (hits[present] / counts[present]).mean().item(),
    }
