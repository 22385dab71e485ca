"""DCLIP's meta-teacher (docs/methods.md §2): bidirectional cross-modal attention over a caption's
token states and an image's regions, pooled into one embedding the student image tower distils.

Inputs (all from frozen CLIP towers; only this module's layers train):
- text: the CLIP text encoder's last hidden states of the caption's tokens strictly between the
  start and end tokens, through ln_final and the text projection — `clip_text_states` — shape
  (B, L, D) with a mask (B, L) of the real ones (no start, no end, no padding); and the caption's
  pooled CLIP text embedding u (B, D), the end token's state, used here only in the region
  weights (and, outside this module, as the InfoNCE target). The end token is never an input:
  its state *is* u, the teacher's own target; the start token's state is one vector for every
  caption;
- regions: the detector crops' embeddings r_1..r_K (B, K, D) with their detector confidences,
  box areas (fractions of the image) and a mask for padding. The whole image is not a region:
  it is the one region of an image with no usable detection (confidence 1, area 1) and the only
  region in the "no regions" ablation (`vla.data.regions.RegionStore.lookup`).

Forward (token states and regions are L2-normalised first: both live in CLIP's cosine space):

    w_k    = s_k / Σ_j s_j,   s_k = conf_k · area_k · max(cos(r_k, u), 0)     (region weights)
    T'     = LN_t(T + MHA_t→r(q=T, k=R, v=R, logits += log w))              (text attends to regions)
    R'     = LN_r(R + MHA_r→t(q=R, k=T, v=T))                              (regions attend to text)
    z_text = Σ_i a_i T'_i,   a = softmax_i(cos(T'_i, mean T') / τ)            (τ = 2, real tokens)
    z_img  = Σ_k b_k R'_k,   b = softmax_k(cos(R'_k, mean R') / τ + log w_k)
    teacher(x, T) = ½ z_text + ½ z_img

The two attention layers run in parallel on the inputs (the image→text stream does not see the
text stream's output), each with a residual and LayerNorm, as the paper describes.

`fusion: average` is the paper's "no bidirectional cross-attention" ablation: the two attention
layers (and their LayerNorms) do not exist; each stream is τ-pooled from its own inputs —
z_text = pool(T), z_img = pool(R, prior log w) with the same region weights — and the teacher is
still ½ z_text + ½ z_img. The two modalities then meet only in that average (and in the region
weights' cos(r_k, u)), never through attention. This teacher has no trainable parameter:
`vla train-teacher` records that and writes the same (empty) teacher for every epoch.

Where the region weight enters, and why: the paper weighs each region by detector confidence,
box area and cosine similarity to the text, and its public code defines that weight but never
calls it. Here log w is an additive prior on the logits of the two places where the teacher
chooses among regions: the text→regions attention (a token attends to region k in proportion to
w_k · exp(q·k/√d)) and the image stream's pooling (b_k ∝ w_k · exp(cos/τ)). So a confident,
large, text-relevant region contributes more and a region that is padding, or whose embedding
points away from the caption (cos ≤ 0, w = 0), contributes nothing. The negative cosines are
clamped because a weight must be non-negative to be normalised; an image whose every region
scores 0 falls back to uniform weights over its regions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOL_TEMPERATURE = 2.0  # DCLIP's τ for the attention pooling of each stream
FUSIONS = ("bidirectional", "average")


@dataclass
class TeacherConfig:
    dim: int                          # CLIP's joint embedding dimension (the text projection's output)
    heads: int = 4                    # attention heads of each cross-attention layer
    pool_temperature: float = POOL_TEMPERATURE
    dropout: float = 0.0
    fusion: str = "bidirectional"     # or "average": no cross-attention (the ablation; module docstring)

    def __post_init__(self) -> None:
        if self.dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"teacher dim {self.dim} must be a positive multiple of heads {self.heads}")
        if self.pool_temperature <= 0:
            raise ValueError(f"pool_temperature must be > 0, not {self.pool_temperature}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {self.fusion!r}")


def region_weights(conf: Tensor, area: Tensor, regions: Tensor, text: Tensor, mask: Tensor) -> Tensor:
    """w_k = s_k / Σ_j s_j with s_k = conf_k · area_k · max(cos(r_k, u), 0) over the real regions.

    conf, area, mask: (B, K); regions (B, K, D); text u (B, D). Padding gets 0; a row whose every
    real region scores 0 gets uniform weights over its real regions.
    """
    cos = F.cosine_similarity(regions, text[:, None, :].expand_as(regions), dim=-1)
    score = conf * area * cos.clamp(min=0) * mask
    total = score.sum(-1, keepdim=True)
    uniform = mask / mask.sum(-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, score / total.clamp(min=torch.finfo(score.dtype).tiny), uniform)


def attention_pool(x: Tensor, mask: Tensor, temperature: float, prior: Tensor | None = None) -> Tensor:
    """DCLIP's temperature-scaled attention pooling over the real positions of x (B, N, D):

        a_i = softmax_i(cos(x_i, mean(x)) / τ [+ prior_i]),   z = Σ_i a_i x_i

    mean(x) is the mean of the real positions; `prior` (log-weights) is added to the logits.
    """
    m = mask.to(x.dtype)
    mean = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    logits = F.cosine_similarity(x, mean[:, None, :].expand_as(x), dim=-1) / temperature
    if prior is not None:
        logits = logits + prior
    logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return (logits.softmax(-1)[..., None] * x).sum(1)


class MetaTeacher(nn.Module):
    """The meta-teacher; see the module docstring for the forward pass and the region weights."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.fusion == "average":  # the ablation: no attention layers at all
            return
        self.text_to_regions = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.regions_to_text = nn.MultiheadAttention(cfg.dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        self.text_norm = nn.LayerNorm(cfg.dim)
        self.region_norm = nn.LayerNorm(cfg.dim)

    def forward(self, tokens: Tensor, token_mask: Tensor, text: Tensor, regions: Tensor, region_mask: Tensor,
                conf: Tensor, area: Tensor) -> Tensor:
        """(B, D) teacher embeddings (not normalised; the losses normalise).

        tokens (B, L, D), token_mask (B, L) bool (the tokens strictly between start and end);
        text (B, D) the pooled text embedding (region weights only); regions (B, K, D) — the
        detector's crops, or the whole image where there are none — region_mask (B, K) bool,
        conf and area (B, K).
        """
        t = F.normalize(tokens, dim=-1)
        r = F.normalize(regions, dim=-1)
        token_mask, region_mask = token_mask.bool(), region_mask.bool()
        w = region_weights(conf, area, r, text, region_mask.to(r.dtype))
        log_w = torch.log(w)  # −inf for padding and irrelevant regions: they are never attended
        tau = self.cfg.pool_temperature
        if self.cfg.fusion == "average":
            return 0.5 * attention_pool(t, token_mask, tau) + 0.5 * attention_pool(r, region_mask, tau, prior=log_w)
        b, n_tok, n_reg = t.shape[0], t.shape[1], r.shape[1]
        heads = self.cfg.heads
        prior = log_w[:, None, None, :].expand(b, heads, n_tok, n_reg).reshape(b * heads, n_tok, n_reg)
        attended, _ = self.text_to_regions(t, r, r, attn_mask=prior, need_weights=False)
        t2 = self.text_norm(t + attended)
        attended, _ = self.regions_to_text(r, t, t, key_padding_mask=~token_mask, need_weights=False)
        r2 = self.region_norm(r + attended)
        z_text = attention_pool(t2, token_mask, tau)
        z_image = attention_pool(r2, region_mask, tau, prior=log_w)
        return 0.5 * z_text + 0.5 * z_image


def clip_text_states(model: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The frozen CLIP text tower's outputs for DCLIP's teacher, in one pass:
    (token states (B, L, D) through ln_final and the text projection, real-token mask (B, L),
    pooled text embedding (B, D), equal to `model.encode_text(tokens)`).

    The token states are those of the tokens strictly between the start and end tokens, left
    aligned (position j holds token j+1), L = the longest such run in the batch (at least 1): no
    start token, no end token, no padding (docs/methods.md §2; the public code drops both). open_clip's
    CLIP tokenizer puts the start token first, pads with 0 and gives the end token the largest id,
    which is how its own 'argmax' pooling finds it. Masked positions hold zeros. A caption with no
    token between start and end (an empty text) gets one zero state, masked in, so that it still
    has a position to attend to.
    """
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if not all(hasattr(model, a) for a in needed) or getattr(model, "text_pool_type", "argmax") != "argmax":
        raise ValueError(f"{type(model).__name__}: DCLIP's token states need open_clip's CLIP text tower "
                         f"(argmax pooling), as the OpenAI and vla CLIPs have")
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    proj = model.text_projection
    x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    eot = tokens.argmax(dim=-1)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    inner = (eot - 1).clamp(min=0)  # how many tokens lie strictly between start and end
    length = max(int(inner.max()) if inner.numel() else 0, 1)
    mask = torch.arange(length, device=tokens.device)[None, :] < inner[:, None]
    states = x[:, 1:1 + length] * mask[..., None].to(x.dtype)
    mask[inner == 0, 0] = True  # an empty caption: one zero state
    return states, mask, pooled


# ---------------------------------------------------------------------------------------- on disk

CONFIG_FILE = "teacher.json"


def epoch_file(epoch: int) -> str:
    return f"teacher-epoch{epoch:03d}.safetensors"


def save_teacher(teacher: MetaTeacher, out_dir: Path, epoch: int) -> Path:
    from vla.models.weights import save_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(teacher.cfg), indent=1) + "\n")
    path = out_dir / epoch_file(epoch)
    save_state_dict(teacher.state_dict(), path)
    return path


def load_teacher(directory: Path, epoch: int) -> MetaTeacher:
    from vla.models.weights import load_state_dict

    teacher = MetaTeacher(TeacherConfig(**json.loads((directory / CONFIG_FILE).read_text())))
    teacher.load_state_dict(load_state_dict(directory / epoch_file(epoch)))
    return teacher.eval()


# ---------------------------------------------------------------------------------- the frozen CLIP

#: artifact kinds whose `model/` is a plain CLIP in open_clip's layout
CLIP_KINDS = ("pretrain", "train-student")


def load_dclip_clip(ref: str, role: str = "--clip"):
    """The CLIP DCLIP's stages read: a registry name / open_clip name / directory, or a pretrain
    (or train-student) artifact. Returns (ClipModel, what the manifest records, identity), the
    identity being an artifact's content digest or the name, so that tables built with one CLIP
    are never read with another."""
    from vla.artifacts import open_artifact
    from vla.models.clip import load_clip

    if (Path(ref) / "manifest.json").exists():
        art = open_artifact(ref, CLIP_KINDS, role=role)
        clip = load_clip("local-dir:" + str(art.path / "model"))
        clip.name = Path(ref).name
        return clip, art.reference(), art.digest
    return load_clip(ref), {"path": ref, "kind": "model"}, ref
