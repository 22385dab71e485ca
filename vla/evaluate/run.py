"""Run every eval set on one model through the `DualEncoder` protocol.

Retrieval-like sets (retrieval, long_retrieval, regional_retrieval) also report where the text side
truncated: `text_truncated_fraction` (texts needing more tokens than `context_length`; 0 when the
text side reads any length) and `context_length` (None for such a model). Captioning sets need a
model that also generates (`Captioner`); for any other model they are left out of its results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image

from vla.evaluate.captioning import captioning_metrics
from vla.evaluate.evalsets import RETRIEVAL_TASKS, EvalSet
from vla.evaluate.retrieval import retrieval_metrics
from vla.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
from vla.models.encoder import DualEncoder
from vla.textbatch import encode_length_sorted


@runtime_checkable
class Captioner(Protocol):
    def generate_captions(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image."""


def _batched_images(model: DualEncoder, images: Sequence[Image.Image], batch: int) -> torch.Tensor:
    # normalise again, as CLIP_benchmark does: metrics assume unit vectors whatever the model does
    return F.normalize(torch.cat([model.encode_image(list(images[i:i + batch]))
                                  for i in range(0, len(images), batch)]).float(), dim=-1)


def _batched_texts(model: DualEncoder, texts: Sequence[str], batch: int) -> torch.Tensor:
    # length-sorted batches: an embedder that reads long captions pads each batch far less
    return F.normalize(encode_length_sorted(lambda b: model.encode_text(b).float(), texts, batch),
                       dim=-1)


def truncation(model: DualEncoder, texts: Sequence[str]) -> dict[str, float | int | None]:
    """Fraction of texts longer than the text context, and that context (None: no limit)."""
    context = model.text_context_length
    if context is None or not texts:
        return {"text_truncated_fraction": 0.0, "context_length": context}
    counts = model.text_token_counts(texts)
    return {"text_truncated_fraction": sum(c > context for c in counts) / len(counts),
            "context_length": context}


def evaluate_set(model: DualEncoder, es: EvalSet, batch_size: int = 256,
                 mode: str = "clip_benchmark") -> dict[str, float] | None:
    """The metrics of one set (None for a captioning set and a model that does not generate);
    `mode` says how tied scores rank (`retrieval.MODES`)."""
    if es.task in RETRIEVAL_TASKS:
        texts, owner = es.texts()
        metrics = retrieval_metrics(_batched_images(model, es.images, batch_size),
                                    _batched_texts(model, texts, batch_size), owner, mode=mode)
        return {**metrics, **truncation(model, texts),
                "n_images": len(es.images), "n_texts": len(texts)}
    if es.task == "zeroshot_classification":
        classifier = zeroshot_classifier(model.encode_text, es.classnames, es.templates)
        metrics = zeroshot_metrics(_batched_images(model, es.images, batch_size), es.labels,
                                   classifier, mode=mode)
        return {**metrics, "n_images": len(es.images), "n_classes": len(es.classnames)}
    if es.task == "captioning":
        if not isinstance(model, Captioner):
            return None
        generated = [c for i in range(0, len(es.images), batch_size)
                     for c in model.generate_captions(list(es.images[i:i + batch_size]))]
        return {**captioning_metrics(generated, es.captions), "n_images": len(es.images)}
    raise ValueError(f"unknown task {es.task!r}")


def evaluate_model(model: DualEncoder, sets: Sequence[EvalSet], batch_size: int = 256,
                   mode: str = "clip_benchmark") -> dict[str, dict[str, float]]:
    """{set name: {metric: value}} for every set this model can be measured on."""
    results = {}
    for es in sets:
        metrics = evaluate_set(model, es, batch_size, mode)
        if metrics is not None:
            results[es.name] = metrics
    return results


@dataclass
class RetrievalExamples:
    """A few text queries against a set's images, for `report.write_retrieval_grid`."""
    model: str
    set_name: str
    images: Sequence[Image.Image]
    queries: list[str]
    targets: list[int]          # the correct image of each query
    scores: torch.Tensor        # [Q, N] query × image similarities


def retrieval_examples(model: DualEncoder, es: EvalSet, n_queries: int = 4,
                       batch_size: int = 256) -> RetrievalExamples:
    """The first caption of `n_queries` images spread evenly over a retrieval set, scored
    against all its images, for `report.write_retrieval_grid`."""
    if es.task not in RETRIEVAL_TASKS:
        raise ValueError(f"retrieval examples need a retrieval set, {es.name} is {es.task}")
    n = len(es.images)
    targets = sorted({round(i * (n - 1) / max(1, n_queries - 1)) for i in range(n_queries)})
    queries = [es.captions[i][0] for i in targets]
    scores = _batched_texts(model, queries, batch_size) @ _batched_images(model, es.images,
                                                                          batch_size).T
    return RetrievalExamples(model=model.name, set_name=es.name, images=es.images,
                             queries=queries, targets=targets, scores=scores)
