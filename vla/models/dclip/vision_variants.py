"""DCLIP's ViT-L additions to a CLIP image tower (docs/methods.md §2): 2-D rotary position embeddings
in place of the absolute ones, and three-cluster embedding aggregation. `vla train-student`
switches them on (`rope_2d`, `clusters`); the trained tower keeps open_clip's state-dict layout,
and `vla_vision.json` beside open_clip's files says which changes to re-apply: `load_clip` does so
for a local directory, and `vla export` refuses such a student (open_clip alone would load it
without them and compute other embeddings, silently).

**2-D RoPE** (`rope_2d`). The learned absolute positional embedding is zeroed and frozen (the
parameter stays, at 0, so the weights file keeps open_clip's keys), and every attention block of
the tower rotates its queries and keys by their patch's grid position (axial 2-D RoPE, as in
RoPE-ViT): per head of dimension d, the first d/2 channels form d/4 pairs rotated by the row y, the
last d/2 channels d/4 pairs rotated by the column x,

    (q_{2j}, q_{2j+1}) ← (q_{2j} cos θ − q_{2j+1} sin θ,  q_{2j} sin θ + q_{2j+1} cos θ),
    θ = y · base^(−j/(d/4)) in the first half,  θ = x · base^(−j/(d/4)) in the second,

so that q(p)·k(p') depends on p − p' only. The class token (and any other prefix token) is not
rotated. Only open_clip's `VisionTransformer` with a learned positional embedding, plain
self-attention blocks, no attention pooler and no patch dropout is supported; any other tower is
refused with one line.

**Three-cluster aggregation** (`clusters: 3`). What the paper says (the DCLIP review in seeds/,
§4): a ViT-L student distilled the basic way over-fits to the text and loses the image–text
balance, so the authors changed the embedding aggregation strategy — averaging the embeddings of
three semantic clusters was much more robust. It does not say what is clustered. vla's reading:
the image embedding is aggregated from the tower's output tokens by semantic cluster instead of
taken from the class token alone. Per image, the patch tokens (after ln_post, before the
projection) are grouped into k = 3 clusters by cosine k-means (deterministic farthest-point
initialisation, a fixed number of iterations, assignments without gradient), each cluster is
averaged, and the embedding is the mean of the k cluster means, then projected:

    c_1 = argmax_i cos(x_i, mean x),  c_j = argmin_i max_{l<j} cos(x_i, c_l)        (init)
    C_j = {i : j = argmax_l cos(x_i, c_l)},  c_j = mean_{i∈C_j} x_i                  (iterate)
    E_I(x) = proj((1/|J|) Σ_{j∈J} c_j),  J the non-empty clusters

Why this reading: "embedding aggregation" is how a tower turns its tokens into one embedding (the
class token, a mean, an attention pool), and weighting three semantic groups equally keeps one
dominant object (or the text-aligned class token) from deciding the embedding alone, which is
the imbalance the paper describes. It changes the student's forward, so it applies in training
and at inference alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla.errors import UserError

VARIANTS_FILE = "vla_vision.json"


@dataclass
class VisionVariant:
    """Which of DCLIP's tower changes apply (all off: the tower as open_clip built it)."""

    rope_2d: bool = False
    rope_base: float = 100.0     # the frequencies' base; 100 suits grids of tens of patches (RoPE-ViT)
    clusters: int = 0            # 0: the tower's own pooling; k ≥ 2: k-cluster aggregation (DCLIP: 3)
    cluster_iters: int = 5

    def __post_init__(self) -> None:
        if self.clusters < 0 or self.clusters == 1:
            raise UserError(f"clusters must be 0 (off) or at least 2, not {self.clusters}")
        if self.rope_base <= 1 or self.cluster_iters < 1:
            raise UserError("rope_base must be > 1 and cluster_iters at least 1")

    @property
    def active(self) -> bool:
        return self.rope_2d or self.clusters > 0

    def describe(self) -> str:
        parts = (["2-D RoPE"] if self.rope_2d else []) + ([f"{self.clusters}-cluster aggregation"]
                                                          if self.clusters else [])
        return " and ".join(parts) or "no change"


# ------------------------------------------------------------------------------------ rotary 2-D


def rope_angles(positions: Tensor, head_dim: int, base: float = 100.0) -> Tensor:
    """(N, head_dim/2) rotation angles for (N, 2) grid positions (row y, column x): pair j < d/4
    turns by y·base^(−j/(d/4)), pair d/4 + j by x·base^(−j/(d/4))."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, not {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = positions.to(torch.float64)
    return torch.cat([pos[:, :1] * freqs, pos[:, 1:2] * freqs], dim=1)


def grid_positions(grid_h: int, grid_w: int) -> Tensor:
    """(grid_h·grid_w, 2) (y, x) of each patch in open_clip's raster order (row by row)."""
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], dim=1)


def rotate(x: Tensor, angles: Tensor) -> Tensor:
    """x (..., N, d) with its channel pairs (2j, 2j+1) rotated by angles (N, d/2)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class RopeSelfAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with the same parameters (and state-dict keys) whose queries and keys
    are rotated by 2-D RoPE after the input projection; the first `prefix` tokens (the class
    token) are not rotated. Self-attention only, as in a ViT block."""

    def set_rope(self, angles: Tensor, prefix: int) -> None:
        self.prefix = prefix
        self.register_buffer("rope_angles", angles.float(), persistent=False)  # not in the weights file

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None, need_weights: bool = False,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False):
        if not (query is key is value) or key_padding_mask is not None or need_weights:
            raise NotImplementedError("RopeSelfAttention: plain self-attention without weights only")
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        heads = self.num_heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, hd)
        p = self.prefix
        q = torch.cat([q[..., :p, :], rotate(q[..., p:, :], self.rope_angles)], dim=-2)
        k = torch.cat([k[..., :p, :], rotate(k[..., p:, :], self.rope_angles)], dim=-2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, d))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _check_vit(visual: nn.Module, what: str) -> None:
    from open_clip.transformer import VisionTransformer

    why = None
    if not isinstance(visual, VisionTransformer):
        why = f"its image tower is a {type(visual).__name__}"
    elif getattr(visual, "attn_pool", None) is not None:
        why = "its ViT pools with an attention pooler"
    elif not isinstance(visual.patch_dropout, nn.Identity):
        why = "its ViT uses patch dropout (which reorders positions)"
    elif what == "rope_2d" and not isinstance(getattr(visual, "positional_embedding", None), nn.Parameter):
        why = "its ViT has no learned absolute positional embedding to replace"
    elif what == "clusters" and getattr(visual, "final_ln_after_pool", False):
        why = "its ViT applies ln_post after pooling"
    if why:
        raise UserError(f"{what}: {why}; DCLIP's {what} needs open_clip's plain VisionTransformer: "
                        f"set {what} off for this CLIP")


def apply_rope_2d(visual: nn.Module, base: float = 100.0) -> None:
    """Replace the tower's absolute positions by 2-D RoPE in place (see the module docstring)."""
    _check_vit(visual, "rope_2d")
    blocks = list(visual.transformer.resblocks)
    heads, width = blocks[0].attn.num_heads, blocks[0].attn.embed_dim
    if (width // heads) % 4:
        raise UserError(f"rope_2d: head dimension {width // heads} is not divisible by 4; set rope_2d off for "
                        f"this CLIP")
    grid_h, grid_w = visual.grid_size
    prefix = visual.positional_embedding.shape[0] - grid_h * grid_w
    angles = rope_angles(grid_positions(grid_h, grid_w), width // heads, base)
    with torch.no_grad():
        visual.positional_embedding.zero_()
    visual.positional_embedding.requires_grad_(False)
    for block in blocks:
        old = block.attn
        if isinstance(old, RopeSelfAttention):
            continue
        new = RopeSelfAttention(old.embed_dim, old.num_heads, dropout=old.dropout, batch_first=old.batch_first)
        new.load_state_dict(old.state_dict())
        new.to(device=old.in_proj_weight.device, dtype=old.in_proj_weight.dtype)
        new.set_rope(angles.to(old.in_proj_weight.device), prefix)
        new.train(old.training)
        for p_new, p_old in zip(new.parameters(), old.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        block.attn = new


# ----------------------------------------------------------------------------- cluster pooling


@torch.no_grad()
def cluster_assignments(tokens: Tensor, k: int, iters: int) -> Tensor:
    """(B, N) cluster index of each token of tokens (B, N, W): cosine k-means, farthest-point init."""
    x = F.normalize(tokens.float(), dim=-1)
    b, n, _ = x.shape
    k = min(k, n)
    rows = torch.arange(b, device=x.device)
    mean = F.normalize(x.mean(1), dim=-1)
    first = torch.einsum("bnw,bw->bn", x, mean).argmax(1)
    centres = [x[rows, first]]
    closest = torch.einsum("bnw,bw->bn", x, centres[0])
    for _ in range(1, k):
        nxt = closest.argmin(1)
        centres.append(x[rows, nxt])
        closest = torch.maximum(closest, torch.einsum("bnw,bw->bn", x, centres[-1]))
    c = torch.stack(centres, 1)  # (B, k, W)
    for _ in range(iters):
        assign = torch.einsum("bnw,bkw->bnk", x, c).argmax(-1)
        onehot = F.one_hot(assign, k).to(x.dtype)  # (B, N, k)
        count = onehot.sum(1)  # (B, k)
        means = torch.einsum("bnk,bnw->bkw", onehot, x) / count.clamp(min=1)[..., None]
        c = torch.where(count[..., None] > 0, F.normalize(means, dim=-1), c)
    return torch.einsum("bnw,bkw->bnk", x, c).argmax(-1)


def cluster_pool(tokens: Tensor, k: int = 3, iters: int = 5) -> Tensor:
    """(B, W): the mean over the non-empty clusters of each cluster's mean token (see the module
    docstring); gradients flow through the means, not the assignments."""
    assign = cluster_assignments(tokens, k, iters)
    onehot = F.one_hot(assign, min(k, tokens.shape[1])).to(tokens.dtype)  # (B, N, k)
    count = onehot.sum(1)  # (B, k)
    means = torch.einsum("bnk,bnw->bkw", onehot, tokens) / count.clamp(min=1)[..., None]
    used = (count > 0).to(tokens.dtype)
    return (means * used[..., None]).sum(1) / used.sum(1, keepdim=True)


def apply_clusters(visual: nn.Module, k: int, iters: int) -> None:
    """Pool the tower's patch tokens by `cluster_pool` instead of its class token, in place."""
    _check_vit(visual, "clusters")
    prefix = visual.positional_embedding.shape[0] - visual.grid_size[0] * visual.grid_size[1]

    def global_pool(x: Tensor) -> tuple[Tensor, Tensor]:
        tokens = x[:, prefix:]
        return cluster_pool(tokens, k, iters), tokens

    visual._global_pool = global_pool  # an instance attribute: the state dict is unchanged


# ---------------------------------------------------------------------------------------- on disk


def apply_variant(visual: nn.Module, variant: VisionVariant) -> None:
    if variant.rope_2d:
        apply_rope_2d(visual, variant.rope_base)
    if variant.clusters:
        apply_clusters(visual, variant.clusters, variant.cluster_iters)


def save_variant(model_dir: Path, variant: VisionVariant) -> None:
    """Record the tower changes beside open_clip's files (nothing when there are none)."""
    if variant.active:
        (Path(model_dir) / VARIANTS_FILE).write_text(json.dumps(asdict(variant), indent=1) + "\n")


def read_variant(model_dir: Path) -> VisionVariant | None:
    path = Path(model_dir) / VARIANTS_FILE
    if not path.is_file():
        return None
    return VisionVariant(**json.loads(path.read_text()))
