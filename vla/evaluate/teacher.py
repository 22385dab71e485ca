"""DCLIP's meta-teacher scored as a retrieval model: every (caption, image) pair conditioned.

The teacher is a cross-encoder: its output for image x depends on the caption T it is given
(the region weights cos(r_k, u_T), the text→regions and regions→text attention, the text stream
itself). Its natural retrieval score is the one it is trained to maximise for the true pair,

    s(T, x) = cos(teacher(x, T), u_T),   u_T = E_T(T) the frozen CLIP text embedding,

computed for every caption T and every image x: N_texts × N_images teacher forwards, batched
(`pair_batch` pairs per forward). The frozen text tower runs once per caption; each image's
regions come from a regions table (`RegionStore.lookup`). The base CLIP on the same pairs scores
s(T, x) = cos(E_I(x), u_T), E_I(x) the table's whole-image embedding, so the two rows of a table
share their images, captions and text embeddings exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def teacher_score_matrix(teacher, states: Tensor, token_mask: Tensor, pooled: Tensor,
                         regions: dict[str, Tensor], pair_batch: int = 4096,
                         across_images: list | None = None) -> Tensor:
    """[M texts, N images] scores cos(teacher(x_i, T_j), u_j).

    states (M, L, D), token_mask (M, L), pooled u (M, D): the frozen text tower's outputs
    (`vla.models.dclip.clip_text_states`); regions: `RegionStore.lookup` of the N images
    (regions (N, K, D), mask, conf, area (N, K)). Texts are taken max(1, pair_batch // N) at a
    time, each against every image, in one teacher forward. `across_images`, when given, receives
    per text the mean cosine between the teacher's outputs for two different images
    (`mean_pairwise_cosine`): how little the image moves the teacher's output for that caption.
    """
    m, n = states.shape[0], regions["regions"].shape[0]
    device = states.device
    reg = {k: v.to(device) for k, v in regions.items()}
    u = F.normalize(pooled.float(), dim=-1)
    per = max(1, pair_batch // max(n, 1))
    out = torch.empty(m, n, device=device)
    for start in range(0, m, per):
        c = min(per, m - start)

        def texts(x: Tensor) -> Tensor:   # (c, ...) → (c·n, ...): text j repeated for each image
            return x[start:start + c].repeat_interleave(n, dim=0)

        def images(x: Tensor) -> Tensor:  # (n, ...) → (c·n, ...): every image, for each text
            return x.repeat(c, *([1] * (x.ndim - 1)))

        emb = teacher(tokens=texts(states), token_mask=texts(token_mask), text=texts(pooled),
                      regions=images(reg["regions"]), region_mask=images(reg["mask"]),
                      conf=images(reg["conf"]), area=images(reg["area"]))
        emb = F.normalize(emb.float(), dim=-1).view(c, n, -1)
        out[start:start + c] = (emb * u[start:start + c, None, :]).sum(-1)
        if across_images is not None:
            across_images += mean_pairwise_cosine(emb).tolist()
    return out


def mean_pairwise_cosine(emb: Tensor) -> Tensor:
    """(..., n, D) unit vectors → (...) the mean of cos(e_i, e_i') over the n(n−1) ordered pairs i ≠ i':
    (‖Σ_i e_i‖² − n) / (n(n − 1))."""
    n = emb.shape[-2]
    return ((emb.sum(-2) ** 2).sum(-1) - n) / max(n * (n - 1), 1)


@torch.no_grad()
def text_outputs(text_tower, captions: list[str], batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """The frozen text tower's (token states, mask, pooled u) for `captions`, batched, the token
    positions padded to the longest caption (masked)."""
    parts = [text_tower.states(text_tower.tokenize(captions[s:s + batch_size]).to(_device(text_tower)))
             for s in range(0, len(captions), batch_size)]
    length = max(p[0].shape[1] for p in parts)
    states = torch.cat([F.pad(p[0], (0, 0, 0, length - p[0].shape[1])) for p in parts])
    mask = torch.cat([F.pad(p[1], (0, length - p[1].shape[1])) for p in parts])
    return states, mask, torch.cat([p[2] for p in parts])


def _device(text_tower) -> torch.device:
    return next(text_tower.clip.model.parameters()).device
