"""Image–text retrieval recall@K with several captions per image, as CLIP_benchmark defines it.

Scores are cosine similarities `s[t, i] = text_t · image_i` (embeddings L2-normalised).

- Text→image (CLIP_benchmark's `image_retrieval_recall@K`): caption `t` scores 1 if its image is
  among the K best-scoring images for `t`; averaged over captions.
- Image→text (`text_retrieval_recall@K`): image `i` scores 1 if **at least one** of its captions is
  among the K best-scoring captions for `i`; averaged over images (an image without captions
  scores 0, as CLIP_benchmark's 0/0 → NaN → "not > 0" does).
- `mean_recall`: the mean of all these recalls (R@1/5/10 both ways → six numbers).

Ties. CLIP_benchmark ranks with `torch.topk`, which breaks ties arbitrarily. Here a tie counts
against the model: the rank of the (best) positive is the number of *negatives* scoring at least as
high as it, and a hit at K means that rank < K. So a model that gives every pair the same score gets
recall ≈ K / candidates, never 100%. Without ties this is exactly CLIP_benchmark's number: "some
positive in the top K" ⇔ "the best positive in the top K" ⇔ "fewer than K negatives above it".

Memory. CLIP_benchmark materialises the texts × images score matrix and, per batch,
a texts × K × images one-hot tensor. `retrieval_metrics` only ever holds a chunk × images or
chunk × texts block of scores: ranks come from "count of negatives with score ≥ positive score",
which needs no sorting and nothing K-sized. `reference_retrieval_metrics` is the CLIP_benchmark way,
kept for tests and `make bench`.
"""

from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_KS = (1, 5, 10)


def _check(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image) -> torch.Tensor:
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=text_emb.device)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embeddings must be [N, D] and [M, D], got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    if t2i.shape != (text_emb.shape[0],):
        raise ValueError(f"text_to_image must have one entry per text ({text_emb.shape[0]}), "
                         f"got shape {tuple(t2i.shape)}")
    if len(t2i) and (t2i.min() < 0 or t2i.max() >= image_emb.shape[0]):
        raise ValueError(f"text_to_image values must lie in [0, {image_emb.shape[0]})")
    return t2i


def _keys(t2i_hits: dict[int, float], i2t_hits: dict[int, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in t2i_hits:
        out[f"image_retrieval_recall@{k}"] = t2i_hits[k]
        out[f"text_retrieval_recall@{k}"] = i2t_hits[k]
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def text_to_image_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                        chunk: int = 1024) -> torch.Tensor:
    """[M] pessimistic 0-based rank of each caption's image: #other images with score ≥ its own."""
    t2i = _check(image_emb, text_emb, text_to_image)
    ranks = torch.empty(len(t2i), dtype=torch.long)
    for start in range(0, len(t2i), chunk):
        scores = text_emb[start:start + chunk] @ image_emb.T                 # [c, N]
        target = t2i[start:start + chunk]
        positive = scores.gather(1, target[:, None])                         # [c, 1]
        # the positive itself is always ≥ itself: subtract it to count negatives only.
        # (int32 sums: torch's default int64 reduction of a bool matrix is ~2× slower on CPU)
        ranks[start:start + chunk] = ((scores >= positive).sum(1, dtype=torch.int32) - 1).cpu()
    return ranks


@torch.no_grad()
def image_to_text_ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                        chunk: int = 1024) -> torch.Tensor:
    """[N] pessimistic 0-based rank of each image's best caption: #non-captions with score ≥ it.

    Images without captions get rank M (never a hit).
    """
    t2i = _check(image_emb, text_emb, text_to_image)
    n_images, n_texts = image_emb.shape[0], text_emb.shape[0]
    ranks = torch.empty(n_images, dtype=torch.long)
    for start in range(0, n_images, chunk):
        scores = image_emb[start:start + chunk] @ text_emb.T                 # [c, M]
        c = scores.shape[0]
        # this chunk's captions, read from `scores` itself so that every comparison below is
        # between bit-identical numbers (a separately computed dot product may differ in the
        # last bit and break ties the wrong way)
        mine = ((t2i >= start) & (t2i < start + c)).nonzero().squeeze(1)
        row = t2i[mine] - start
        positive = scores[row, mine]
        best = torch.full((c,), float("-inf"), device=scores.device, dtype=scores.dtype)
        best = best.scatter_reduce(0, row, positive, "amax")
        at_least_best = (scores >= best[:, None]).sum(1, dtype=torch.int32)
        positives_at_least_best = torch.zeros_like(at_least_best).scatter_add(
            0, row, (positive >= best[row]).int())
        rank = at_least_best - positives_at_least_best
        rank[torch.bincount(row, minlength=c) == 0] = n_texts
        ranks[start:start + c] = rank.cpu()
        del scores  # free this block before the next is computed: peak memory is one block
    return ranks


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                      ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> dict[str, float]:
    """Recall@K both ways and their mean, never holding more than chunk × max(N, M) scores.

    image_emb [N, D] and text_emb [M, D] L2-normalised; text_to_image [M] the image of each text.
    Keys: `image_retrieval_recall@K` (text→image), `text_retrieval_recall@K` (image→text),
    `mean_recall`.
    """
    t2i_rank = text_to_image_ranks(image_emb, text_emb, text_to_image, chunk)
    i2t_rank = image_to_text_ranks(image_emb, text_emb, text_to_image, chunk)
    return _keys({k: (t2i_rank < k).double().mean().item() for k in ks},
                 {k: (i2t_rank < k).double().mean().item() for k in ks})


@torch.no_grad()
def reference_retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                                ks: Sequence[int] = DEFAULT_KS,
                                batch_size: int = 64) -> dict[str, float]:
    """CLIP_benchmark's computation, step for step: the full texts × images score matrix, a
    texts × images boolean `positive_pairs`, and per batch of rows `topk` + a rows × K × columns
    one-hot. Ties go to `torch.topk`'s arbitrary order. For tests and benchmarks only."""
    t2i = _check(image_emb, text_emb, text_to_image)
    scores = text_emb @ image_emb.T
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), t2i] = True

    def recall_at_k(s: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
        topk = torch.topk(s, k, dim=1)[1]
        onehot = torch.nn.functional.one_hot(topk, num_classes=s.shape[1])  # rows × K × columns
        true_positive = (onehot * pos.view(s.shape[0], 1, s.shape[1])).sum(dim=(1, 2))
        return true_positive / pos.sum(dim=1)

    def batchify(s: torch.Tensor, pos: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cat([recall_at_k(s[i:i + batch_size], pos[i:i + batch_size], k)
                          for i in range(0, len(s), batch_size)])

    return _keys({k: (batchify(scores, positive_pairs, k) > 0).float().mean().item() for k in ks},
                 {k: (batchify(scores.T, positive_pairs.T, k) > 0).float().mean().item()
                  for k in ks})
