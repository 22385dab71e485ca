"""Image–text retrieval recall@K with several captions per image, as CLIP_benchmark defines it.

Scores are cosine similarities `s[t, i] = text_t · image_i` (embeddings L2-normalised).

- Text→image (CLIP_benchmark's `image_retrieval_recall@K`): caption `t` scores 1 if its image is
  among the K best-scoring images for `t`; averaged over captions.
- Image→text (`text_retrieval_recall@K`): image `i` scores 1 if **at least one** of its captions is
  among the K best-scoring captions for `i`; averaged over images (an image without captions
  scores 0, as CLIP_benchmark's 0/0 → NaN → "not > 0" does).
- `mean_recall`: the mean of all these recalls (R@1/5/10 both ways → six numbers).

Ties — where a query's positive scores exactly as much as some negative — are where ways of
ranking differ. Three modes (`MODES`):
- `clip_benchmark` (default): CLIP_benchmark's computation, bit for bit: the texts × images matrix
  `texts_emb @ images_emb.t()`, and per K one `torch.topk(rows, K)` over its rows (text→image) and
  over the rows of its transpose (image→text), in the same column order. Among tied scores,
  `topk`'s own order decides, exactly as in CLIP_benchmark. Equal embeddings give equal numbers,
  ties or not. Holds the M × N score matrix, as CLIP_benchmark does.
- `pessimistic`: a tie counts against the model. A query hits at K when fewer than K negatives
  score ≥ its best positive. A model that gives every pair the same score gets recall exactly 0
  at every K below the number of candidates. A lower bound on every other mode.
- `expected`: the exact expectation over a uniformly random order among tied scores. With g
  negatives scoring above the best positive score, e negatives and p positives tied at it, and
  m = K − g: P(hit) = 0 if m ≤ 0, 1 if m > e, else 1 − C(e, m) / C(e + p, m) (the first m
  tied places all negatives). A model scoring every pair alike gets recall K / candidates
  (text→image). Well defined, unlike an order that depends on a kernel.
Without ties the three modes agree. Every mode reports `image_retrieval_ties` /
`text_retrieval_ties`: how many text / image queries had a negative tied with their (best)
positive.

Memory. `pessimistic` and `expected` stream: a block of query rows × every candidate is scored
(`BLOCK_ELEMENTS` scores at most, fewer rows the more candidates there are), its counts g, e, p
per query are turned into hits at each K and summed, and the block is freed before the next. So
they hold one block (64 MB in float32) and its comparison masks, plus the captions of each image
as an index (O(M) integers), whatever N × M is: 100,000 images × 500,000 captions take the same
working memory as 5,000 × 25,000, and the numbers are those of the whole matrix by construction
(every query's row is whole inside one block). The tie counts come from the same blocks in every
mode. `clip_benchmark` holds the M × N score matrix, as CLIP_benchmark does (`topk`'s order among
ties is that of a whole row of that matrix); it does not materialise CLIP_benchmark's per-batch
rows × K × columns one-hot tensor: it reads the `topk` indices directly, which is the same test
("some positive among the top K").
`reference_retrieval_metrics` is CLIP_benchmark's code step for step, kept for tests and
`make bench`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Sequence

import torch

DEFAULT_KS = (1, 5, 10)
MODES = ("clip_benchmark", "pessimistic", "expected")
#: scores held at once by the count-based modes (one block of query rows × every candidate):
#: 64 MB in float32, whatever the number of images and captions
BLOCK_ELEMENTS = 1 << 24
MASK_ELEMENTS = 1 << 20   # scores compared at once within a block (their masks and sums: ~5 MB)


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


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown ranking mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _keys(t2i_hits: dict[int, float], i2t_hits: dict[int, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in t2i_hits:
        out[f"image_retrieval_recall@{k}"] = t2i_hits[k]
        out[f"text_retrieval_recall@{k}"] = i2t_hits[k]
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


# ------------------------------------------------------------- counts around the best positive

def _counts(scores: torch.Tensor, row: torch.Tensor, col: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, e, p) per row of `scores` [c, n] whose positives are (row[j], col[j]): negatives above
    the best positive, negatives tied with it, positives tied with it."""
    c = scores.shape[0]
    positive = scores[row, col]     # read from `scores` itself: ties compare identical numbers
    best = torch.full((c,), float("-inf"), device=scores.device, dtype=scores.dtype)
    best = best.scatter_reduce(0, row, positive, "amax")
    # Compared a slice of rows at a time: a summed mask is first cast to the sum's dtype, a copy 4×
    # the block's size in int32 (int32 sums: torch's int64 reduction of a bool matrix is ~2×
    # slower on CPU).
    above = torch.empty(c, dtype=torch.int32, device=scores.device)
    at = torch.empty_like(above)
    step = max(1, MASK_ELEMENTS // max(scores.shape[1], 1))
    for r in range(0, c, step):
        s, b = scores[r:r + step], best[r:r + step, None]
        above[r:r + step] = (s > b).sum(1, dtype=torch.int32)
        at[r:r + step] = (s == b).sum(1, dtype=torch.int32)
    p = torch.zeros_like(at).scatter_add(0, row, (positive == best[row]).int())
    # a row without positives: more negatives above than any K, none tied (never a hit)
    none = torch.bincount(row, minlength=c) == 0
    above[none], at[none], p[none] = torch.iinfo(torch.int32).max, 1, 1
    return above.long(), (at - p).long(), p.long()


def block_rows(n_columns: int, chunk: int = 1024, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Query rows per block of scores: at most `chunk`, and at most `block_elements` scores."""
    return max(1, min(chunk, block_elements // max(n_columns, 1)))


def _captions_by_image(t2i: torch.Tensor, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(texts ordered by their image, offsets): image i's captions are
    `order[offsets[i]:offsets[i + 1]]`, so a block of images finds its positives without a scan
    over every text."""
    order = torch.sort(t2i, stable=True)[1]
    offsets = torch.zeros(n_images + 1, dtype=torch.long, device=t2i.device)
    offsets[1:] = torch.cumsum(torch.bincount(t2i, minlength=n_images), 0)
    return order, offsets


def _blocks(image_emb: torch.Tensor, text_emb: torch.Tensor, t2i: torch.Tensor, direction: str,
            chunk: int, block_elements: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """(g, e, p) of one block of queries at a time, in query order (module doc, "Memory").

    `t2i`: queries are texts, each block `texts[a:b] @ images.T`, one positive per row.
    `i2t`: queries are images, each block `images[a:b] @ texts.T`, its rows' captions positive."""
    if direction == "t2i":
        rows = block_rows(image_emb.shape[0], chunk, block_elements)
        for start in range(0, text_emb.shape[0], rows):
            scores = text_emb[start:start + rows] @ image_emb.T                  # [c, N]
            row = torch.arange(scores.shape[0], device=scores.device)
            counts = _counts(scores, row, t2i[start:start + rows])
            del scores  # free this block before the next is computed: peak memory is one block
            yield counts
    else:
        n_images = image_emb.shape[0]
        order, offsets = _captions_by_image(t2i, n_images)
        rows = block_rows(text_emb.shape[0], chunk, block_elements)
        for start in range(0, n_images, rows):
            end = min(start + rows, n_images)
            scores = image_emb[start:end] @ text_emb.T                           # [c, M]
            mine = order[offsets[start]:offsets[end]]
            counts = _counts(scores, t2i[mine] - start, mine)
            del scores
            yield counts


@torch.no_grad()
def text_to_image_counts(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                         chunk: int = 1024, block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, ...]:
    """(g, e, p), each [M]: per caption, other images scoring above / tied with its image; p = 1."""
    t2i = _check(image_emb, text_emb, text_to_image)
    return _cat([[x.cpu() for x in b] for b in _blocks(image_emb, text_emb, t2i, "t2i", chunk, block_elements)])


@torch.no_grad()
def image_to_text_counts(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                         chunk: int = 1024, block_elements: int = BLOCK_ELEMENTS) -> tuple[torch.Tensor, ...]:
    """(g, e, p), each [N]: per image, non-captions scoring above / tied with its best caption, and
    its own captions tied with it. An image without captions never hits (g is set past any K)."""
    t2i = _check(image_emb, text_emb, text_to_image)
    return _cat([[x.cpu() for x in b] for b in _blocks(image_emb, text_emb, t2i, "i2t", chunk, block_elements)])


def _cat(blocks: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    if not blocks:
        return (torch.zeros(0, dtype=torch.long),) * 3
    return tuple(torch.cat(x) for x in zip(*blocks))


@torch.no_grad()
def streamed_recalls(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image, direction: str,
                     ks: Sequence[int] = DEFAULT_KS, mode: str = "pessimistic", chunk: int = 1024,
                     block_elements: int = BLOCK_ELEMENTS) -> tuple[dict[int, float], int]:
    """({K: recall@K}, queries with a tie) of one direction (`t2i` or `i2t`) under a count-based
    `mode`, summed block by block: nothing per query outlives its block."""
    if mode not in ("pessimistic", "expected"):
        raise ValueError(f"streamed recalls need a count-based mode (pessimistic, expected), not {mode!r}")
    t2i = _check(image_emb, text_emb, text_to_image)
    hits = {k: 0.0 for k in ks}
    ties = queries = 0
    for g, e, p in _blocks(image_emb, text_emb, t2i, direction, chunk, block_elements):
        for k in ks:
            hits[k] += hit_probability(g, e, p, k, mode).sum().item()
        ties += int((e > 0).sum())
        queries += len(g)
    return {k: h / max(queries, 1) for k, h in hits.items()}, ties


def hit_probability(above: torch.Tensor, tied_neg: torch.Tensor, tied_pos: torch.Tensor, k: int,
                    mode: str) -> torch.Tensor:
    """P(some positive among the top k) per query from (g, e, p): 0/1 when `pessimistic`, the
    expectation over a random order of the tied group when `expected` (see the module doc)."""
    g, e, p = above.double(), tied_neg.double(), tied_pos.double()
    if mode == "pessimistic":
        return (g + e < k).double()
    m = k - g
    inside = (m > 0) & (m <= e)
    # C(e, m) / C(e + p, m) through log-gamma; exact to float64 rounding
    mm = m.clamp(min=0)
    ratio = torch.exp(torch.lgamma(e + 1) - torch.lgamma((e - mm).clamp(min=0) + 1)
                      - torch.lgamma(e + p + 1) + torch.lgamma((e + p - mm).clamp(min=0) + 1))
    return torch.where(m > e, 1.0, torch.where(inside, 1.0 - ratio, 0.0)).double()


# ------------------------------------------------------------------------------- the metrics

@torch.no_grad()
def _clip_benchmark_hits(scores: torch.Tensor, owner_of_column: torch.Tensor | None,
                         positive_column: torch.Tensor | None, k: int,
                         chunk: int) -> torch.Tensor:
    """1/0 per row of `scores`: some positive among `torch.topk(rows, k)`'s indices, rows taken
    `chunk` at a time as CLIP_benchmark's `batchify` does (topk treats every row on its own)."""
    hits = []
    k = min(k, scores.shape[1])  # CLIP_benchmark's topk would fail; every column is then in
    for start in range(0, scores.shape[0], chunk):
        top = torch.topk(scores[start:start + chunk], k, dim=1)[1]          # [c, k]
        rows = torch.arange(start, start + top.shape[0], device=top.device)
        if positive_column is not None:   # text → image: one positive image per text
            hit = (top == positive_column[rows, None]).any(1)
        else:                             # image → text: a column is positive if it is a caption of the row
            hit = (owner_of_column[top] == rows[:, None]).any(1)
        hits.append(hit.double().cpu())
    return torch.cat(hits) if hits else torch.zeros(0, dtype=torch.float64)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                      ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024,
                      mode: str = "clip_benchmark", block_elements: int = BLOCK_ELEMENTS) -> dict[str, float]:
    """Recall@K both ways, their mean, and the tie counts, ranked as `mode` says (module doc).

    image_emb [N, D] and text_emb [M, D] L2-normalised; text_to_image [M] the image of each text.
    Keys: `image_retrieval_recall@K` (text→image), `text_retrieval_recall@K` (image→text),
    `mean_recall`, `image_retrieval_ties`, `text_retrieval_ties`.
    """
    check_mode(mode)
    t2i = _check(image_emb, text_emb, text_to_image)
    counted = "pessimistic" if mode == "clip_benchmark" else mode  # the tie counts are mode-free
    t2i_hits, t2i_ties = streamed_recalls(image_emb, text_emb, t2i, "t2i", ks, counted, chunk, block_elements)
    i2t_hits, i2t_ties = streamed_recalls(image_emb, text_emb, t2i, "i2t", ks, counted, chunk, block_elements)
    if mode == "clip_benchmark":
        scores = text_emb @ image_emb.t()        # CLIP_benchmark's layout: texts × images
        t2i_hits = {k: _clip_benchmark_hits(scores, None, t2i, k, chunk).mean().item() for k in ks}
        i2t_hits = {k: _clip_benchmark_hits(scores.T, t2i, None, k, chunk).mean().item()
                    for k in ks}
        del scores
    return {**_keys(t2i_hits, i2t_hits), "image_retrieval_ties": t2i_ties, "text_retrieval_ties": i2t_ties}


@torch.no_grad()
def score_retrieval_metrics(scores: torch.Tensor, text_to_image, ks: Sequence[int] = DEFAULT_KS,
                            chunk: int = 1024, mode: str = "clip_benchmark") -> dict[str, float]:
    """`retrieval_metrics` from a texts × images score matrix `scores` [M, N] instead of
    embeddings, for a model that scores each (text, image) pair itself (a cross-encoder such as
    DCLIP's meta-teacher). `scores = text_emb @ image_emb.T` gives exactly `retrieval_metrics`.
    Holds the whole matrix (and its boolean comparisons), as the `clip_benchmark` mode does."""
    check_mode(mode)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [M texts, N images], got {tuple(scores.shape)}")
    m, n = scores.shape
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=scores.device)
    if t2i.shape != (m,) or (m and (t2i.min() < 0 or t2i.max() >= n)):
        raise ValueError(f"text_to_image must hold one image index in [0, {n}) per text ({m})")
    texts = torch.arange(m, device=scores.device)
    t2i_counts = _counts(scores, texts, t2i)          # per text: its one image among all images
    i2t_counts = _counts(scores.T, t2i, texts)        # per image: its captions among all texts
    if mode == "clip_benchmark":
        t2i_hits = {k: _clip_benchmark_hits(scores, None, t2i, k, chunk).mean().item() for k in ks}
        i2t_hits = {k: _clip_benchmark_hits(scores.T, t2i, None, k, chunk).mean().item() for k in ks}
    else:
        t2i_hits = {k: hit_probability(*t2i_counts, k, mode).mean().item() for k in ks}
        i2t_hits = {k: hit_probability(*i2t_counts, k, mode).mean().item() for k in ks}
    return {**_keys(t2i_hits, i2t_hits),
            "image_retrieval_ties": int((t2i_counts[1] > 0).sum()),
            "text_retrieval_ties": int((i2t_counts[1] > 0).sum())}


@torch.no_grad()
def reference_retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                                ks: Sequence[int] = DEFAULT_KS,
                                batch_size: int = 64) -> dict[str, float]:
    """CLIP_benchmark's computation, step for step: the full texts × images score matrix, a
    texts × images boolean `positive_pairs`, and per batch of rows `topk` + a rows × K × columns
    one-hot. Ties go to `torch.topk`'s order. For tests and benchmarks only."""
    t2i = _check(image_emb, text_emb, text_to_image)
    scores = text_emb @ image_emb.t()
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
