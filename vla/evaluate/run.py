"""Run every eval set on one model through the `DualEncoder` protocol.

Retrieval-like sets (retrieval, long_retrieval, regional_retrieval) also report where the text side
truncated: `text_truncated_fraction` (texts needing more tokens than `context_length`; 0 when the
text side reads any length) and `context_length` (None for such a model).

Regions: a model that embeds a region from the whole image and its box (`RegionEncoder`, MM-GEM's
RoIAlign) gets the full image and the box; any other model gets the region's crop.

Grounding (`grounding_metrics`): each query caption against the boxes of its own image only,
embedded as regions are; `grounding_acc1` is the fraction of queries whose own box scores highest
(a tie counts against), `grounding_chance` what random picks get (mean of 1/boxes). An
attribute-probe set is scored by `vla.evaluate.probe.attribute_probe`.

Captioning, for a model that also generates (`Captioner`, MM-GEM): the images of a `captioning`
set, scored against all their references, and the regions of a regional set, each against its
region caption, reported as a set of its own, `<regional set>_captioning` (`region_captioning_name`).
Decoding follows `CaptionConfig`; a model that does not generate has no captioning results.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from PIL import Image

from vla.evaluate.captioning import captioning_metrics
from vla.evaluate.evalsets import RETRIEVAL_TASKS, EvalSet, LazyImages
from vla.evaluate.retrieval import retrieval_metrics
from vla.evaluate.zeroshot import zeroshot_classifier, zeroshot_metrics
from vla.models.encoder import DualEncoder
from vla.textbatch import encode_length_sorted


@dataclass
class CaptionConfig:
    """How `vla eval` decodes captions (transformers' `generate`, KV cache) and how many it writes."""

    num_beams: int = 1               # 1: greedy; more: beam search
    max_new_tokens: int = 32         # tokens written at most per caption (end of text included)
    batch_size: int = 64             # images (or regions) decoded per `generate` call
    #: caption at most this many images of a captioning set / regions of a regional set: an evenly
    #: spread subset, fixed by the set alone (`caption_subset`), so every model captions the same
    #: items; None = all. Retrieval always uses the whole set.
    max_images: int | None = None
    max_regions: int | None = None
    #: BLEU-4 / CIDEr-D tokenisation (`vla.evaluate.captioning`): auto = pycocoevalcap's Java
    #: PTBTokenizer when java is there, else the pure-Python one; java insists; python never runs java
    tokenizer: str = "auto"

    def __post_init__(self) -> None:
        from vla.evaluate.captioning import TOKENIZERS

        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, not {self.tokenizer!r}")
        for name in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_images", "max_regions"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 or null (all), not {getattr(self, name)}")


@runtime_checkable
class Captioner(Protocol):
    def caption(self, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor] | None = None,
                **decoding: Any) -> list[str]:
        """One caption per image, or per box (`boxes[b]`: image b's boxes in its own pixels, mapped
        inside as `RegionEncoder.input_boxes` maps them); `decoding`: max_new_tokens, num_beams."""


@runtime_checkable
class RegionEncoder(Protocol):
    def encode_regions(self, images: Sequence[Image.Image], boxes: Sequence[torch.Tensor], *,
                       keys: Sequence[str] | None = None) -> torch.Tensor:
        """(ΣK_b, D) L2-normalised embeddings of image b's boxes `boxes[b]` (image b's own pixels,
        mapped inside through `input_boxes`; a bad box is refused naming `keys[b]`)."""

    def input_boxes(self, images: Sequence[Image.Image], boxes: Sequence[Sequence[Sequence[float]]],
                    keys: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Boxes in each image's own pixels → the model's input pixels."""


def region_captioning_name(set_name: str) -> str:
    """The results entry of region captioning on the regional set `set_name`."""
    return f"{set_name}_captioning"


def caption_subset(n: int, cap: int | None) -> list[int]:
    """`cap` indices spread evenly over range(n) (all when cap is None or ≥ n): the same for every
    model, since it depends on the set's size alone."""
    if cap is None or cap >= n:
        return list(range(n))
    return [i * n // cap for i in range(cap)]

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


def region_embeddings(model: DualEncoder, es: EvalSet, batch_size: int) -> torch.Tensor:
    """The image side of regional retrieval, one row per region: from the full image and the
    box for a `RegionEncoder`, from the region's crop for any other model."""
    if not isinstance(model, RegionEncoder):
        return _batched_images(model, es.images, batch_size)
    out = []
    for batch in _region_batches(es, range(len(es.images)), batch_size):
        images = [src.load() for src in batch]
        out.append(model.encode_regions(images, [src.boxes for src in batch],
                                        keys=[src.image.key for src in batch]).float())
    return F.normalize(torch.cat(out), dim=-1)


def box_embeddings(model: DualEncoder, es: EvalSet, batch_size: int) -> torch.Tensor:
    """One row per box of a set with `boxes` (grounding, attribute_probe), image by image, each
    embedded as a regional set's region is (`region_embeddings`: crop, or full image + box)."""
    refs = [replace(ref, box=tuple(box)) for ref, boxes in zip(es.images.refs, es.boxes) for box in boxes]
    regions = EvalSet(es.name, "regional_retrieval", es.path, LazyImages(refs))
    return region_embeddings(model, regions, batch_size)


def grounding_metrics(model: DualEncoder, es: EvalSet, batch_size: int) -> dict[str, float]:
    """Within-image grounding: accuracy@1 of each query over its own image's boxes, and chance."""
    boxes = box_embeddings(model, es, batch_size)
    texts, _ = es.texts()
    queries = _batched_texts(model, texts, batch_size)
    correct, start = 0, 0
    for caps in es.captions:
        k = len(caps)
        scores = queries[start:start + k] @ boxes[start:start + k].T
        own = scores.diagonal()
        others = scores.masked_fill(torch.eye(k, dtype=torch.bool), -torch.inf).amax(1)
        correct += int((own > others).sum())
        start += k
    # chance: the mean over queries of 1 / (boxes in its image) = images / queries
    return {"grounding_acc1": correct / start, "grounding_chance": len(es.captions) / start,
            **truncation(model, texts), "n_images": len(es.images), "n_texts": start}


def _region_batches(es: EvalSet, indices: Sequence[int], batch_size: int):
    """The source images of the regions `indices`, grouped so a batch holds about `batch_size` regions."""
    batch, n = [], 0
    for src in es.region_sources(list(indices)):
        batch.append(src)
        n += len(src.boxes)
        if n >= batch_size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _decoding(cfg: CaptionConfig) -> dict[str, int]:
    return {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams}


def image_captions(model: Captioner, es: EvalSet, cfg: CaptionConfig) -> tuple[list[int], list[str]]:
    """The images captioned (`caption_subset`) and their captions."""
    chosen = caption_subset(len(es.images), cfg.max_images)
    captions = []
    for start in range(0, len(chosen), cfg.batch_size):
        images = [es.images[i] for i in chosen[start:start + cfg.batch_size]]
        captions += model.caption(images, **_decoding(cfg))
    return chosen, captions


def region_captions(model: Captioner, es: EvalSet, cfg: CaptionConfig) -> tuple[list[int], list[str]]:
    """The regions captioned (`caption_subset`) and their captions, each from its full image and
    box (the model's region path: RoIAlign, and stage 2's soft prompts when it has them)."""
    chosen = caption_subset(len(es.images), cfg.max_regions)
    captions = []
    for batch in _region_batches(es, chosen, cfg.batch_size):
        images = [src.load() for src in batch]
        captions += model.caption(images, [src.boxes for src in batch], keys=[src.image.key for src in batch],
                                  **_decoding(cfg))
    return chosen, captions


def evaluate_set(model: DualEncoder, es: EvalSet, batch_size: int = 256,
                 mode: str = "clip_benchmark", caption: CaptionConfig | None = None,
                 written: dict[str, list[dict]] | None = None) -> dict[str, float] | None:
    """The metrics of one set (None for a captioning set and a model that does not generate);
    `mode` says how tied scores rank (`retrieval.MODES`). Region captioning is `evaluate_model`'s.
    `written`, when given, receives the generated captions (`captions_written`)."""
    if es.task in RETRIEVAL_TASKS:
        texts, owner = es.texts()
        images = (region_embeddings(model, es, batch_size) if es.task == "regional_retrieval"
                  else _batched_images(model, es.images, batch_size))
        metrics = retrieval_metrics(images, _batched_texts(model, texts, batch_size), owner, mode=mode)
        return {**metrics, **truncation(model, texts),
                "n_images": len(es.images), "n_texts": len(texts)}
    if es.task == "grounding":
        return grounding_metrics(model, es, batch_size)
    if es.task == "attribute_probe":
        from vla.evaluate.probe import attribute_probe
        return attribute_probe(model, es, batch_size)
    if es.task == "zeroshot_classification":
        classifier = zeroshot_classifier(model.encode_text, es.classnames, es.templates)
        metrics = zeroshot_metrics(_batched_images(model, es.images, batch_size), es.labels,
                                   classifier, mode=mode)
        return {**metrics, "n_images": len(es.images), "n_classes": len(es.classnames)}
    if es.task == "captioning":
        if not isinstance(model, Captioner):
            return None
        chosen, generated = image_captions(model, es, caption or CaptionConfig())
        if written is not None:
            written[es.name] = captions_written(es, chosen, generated)
        tokenizer = (caption or CaptionConfig()).tokenizer
        return {**captioning_metrics(generated, [es.captions[i] for i in chosen], tokenizer),
                "n_images": len(es.images), "n_captioned": len(chosen)}
    raise ValueError(f"unknown task {es.task!r}")


def evaluate_region_captioning(model: Captioner, es: EvalSet, caption: CaptionConfig,
                               written: dict[str, list[dict]] | None = None) -> dict[str, float]:
    """BLEU-4 / CIDEr-D of the regions' captions, each against its region caption."""
    chosen, generated = region_captions(model, es, caption)
    if written is not None:
        written[region_captioning_name(es.name)] = captions_written(es, chosen, generated)
    return {**captioning_metrics(generated, [es.captions[i] for i in chosen], caption.tokenizer),
            "n_regions": len(es.images), "n_captioned": len(chosen)}


def evaluate_model(model: DualEncoder, sets: Sequence[EvalSet], batch_size: int = 256,
                   mode: str = "clip_benchmark", caption: CaptionConfig | None = None,
                   written: dict[str, list[dict]] | None = None) -> dict[str, dict[str, float]]:
    """{set name: {metric: value}} for every set this model can be measured on; for a model that
    generates, a regional set also gives `region_captioning_name(set)`. `written`, when given,
    receives the captions generated, by the same entry names."""
    caption = caption or CaptionConfig()
    results = {}
    for es in sets:
        metrics = evaluate_set(model, es, batch_size, mode, caption, written)
        if metrics is not None:
            results[es.name] = metrics
        if es.task == "regional_retrieval" and isinstance(model, Captioner) and isinstance(model, RegionEncoder):
            results[region_captioning_name(es.name)] = evaluate_region_captioning(model, es, caption, written)
    return results


def captions_written(es: EvalSet, chosen: Sequence[int], generated: Sequence[str]) -> list[dict]:
    """One record per captioned item: the sample key, the box for a region, the caption, the references."""
    refs = es.images.refs if hasattr(es.images, "refs") else None
    rows = []
    for i, text in zip(chosen, generated, strict=True):
        row: dict = {"index": i, "key": refs[i].key if refs else str(i)}
        if refs and refs[i].box is not None:
            row["box"] = list(refs[i].box)
        rows.append({**row, "caption": text, "references": es.captions[i]})
    return rows


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
