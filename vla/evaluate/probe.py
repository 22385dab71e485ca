"""A linear probe: how much of an attribute a fixed embedding carries, read by a linear classifier.

`linear_probe` fits multinomial logistic regression (torch, full batch, L-BFGS) on one set of
embeddings and scores it on another. `attribute_probe` runs it twice on an `attribute_probe` eval
set (the synthetic world's `eval/probe`: train and val images with one small object, the class
being that object's fill pattern): once on the model's global image embedding and once on its
embedding of the object's box (the crop, or the full image and the box for a `RegionEncoder`),
both fit on the set's train split and scored on its test split. A fine attribute that the model's
input resolution averages away shows as a global accuracy near chance beside a region accuracy
well above it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(fit_x: torch.Tensor, fit_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int, weight_decay: float = 1e-3, max_iter: int = 200) -> float:
    """Accuracy on (test_x, test_y) of logistic regression fit on (fit_x, fit_y).

    Features are standardised with the fit set's mean and std; the classifier minimises
        L(W, b) = (1/N) Σ_i −log softmax(W x_i + b)[y_i] + weight_decay · ‖W‖²
    (float64, L-BFGS from zeros: deterministic for given inputs).
    """
    fx, tx = fit_x.detach().double().cpu(), test_x.detach().double().cpu()
    mean, std = fx.mean(0), fx.std(0, unbiased=False).clamp_min(1e-8)
    fx, tx = (fx - mean) / std, (tx - mean) / std
    fy, ty = fit_y.long().cpu(), test_y.long().cpu()
    w = torch.zeros(fx.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(fx @ w + b, fy) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((tx @ w + b).argmax(1) == ty).double().mean())


def attribute_probe(model, es, batch_size: int = 256) -> dict[str, float]:
    """`probe_global_acc` / `probe_region_acc`: the linear probe's val accuracy on the global
    image embedding / on the box's embedding; `probe_chance`: the share of the most frequent
    class among the scored images (what a constant answer gets)."""
    from vla.evaluate.run import _batched_images, box_embeddings

    if es.fit is None:
        raise ValueError(f"{es.name} has no train split to fit the probe on")
    n_classes = len(es.classnames)
    fit_y, test_y = torch.tensor(es.fit.labels), torch.tensor(es.labels)
    results = {}
    for name, embed in (("global", lambda s: _batched_images(model, s.images, batch_size)),
                        ("region", lambda s: box_embeddings(model, s, batch_size))):
        results[f"probe_{name}_acc"] = linear_probe(embed(es.fit), fit_y, embed(es), test_y, n_classes)
    results["probe_chance"] = float(torch.bincount(test_y, minlength=n_classes).max()) / len(test_y)
    return {**results, "n_images": len(es.labels), "n_fit": len(es.fit.labels), "n_classes": n_classes}
