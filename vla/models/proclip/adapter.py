"""The adapter ``g`` that maps an LLM embedder's output into CLIP's embedding space.

LLM2CLIP's design, which ProCLIP reuses (docs/methods.md §1):

    g(e) = W_out · LN(B_n ∘ … ∘ B_1(e / ‖e‖)) + b_out,   B_k(x) = x + W2(Dropout(GELU(W1(LN(x)))))

W1 widens by ``expansion``, W2 narrows back, so every block keeps the embedder's width and is
residual; only the final Linear changes the width to CLIP's. The output is not normalised:
losses normalise what enters them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of an `Adapter`: ``in_dim`` (the embedder's width) → ``out_dim`` (CLIP's)."""

    in_dim: int
    out_dim: int
    #: residual blocks
    blocks: int = 1
    #: hidden width of each block's MLP, as a multiple of ``in_dim``
    expansion: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("in_dim", "out_dim", "blocks", "expansion"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdapterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdapterConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def proclip(cls, in_dim: int, out_dim: int, dropout: float = 0.0) -> AdapterConfig:
        """ProCLIP's adapter: 1 block, expansion 8."""
        return cls(in_dim, out_dim, blocks=1, expansion=8, dropout=dropout)

    @classmethod
    def llm2clip(cls, in_dim: int, out_dim: int, dropout: float = 0.0) -> AdapterConfig:
        """LLM2CLIP's adapter: 4 blocks, expansion 2."""
        return cls(in_dim, out_dim, blocks=4, expansion=2, dropout=dropout)

    @classmethod
    def preset(cls, name: str, in_dim: int, out_dim: int, dropout: float = 0.0) -> AdapterConfig:
        """A preset by name (``"proclip"`` or ``"llm2clip"``), as recipes spell it."""
        presets = {"proclip": cls.proclip, "llm2clip": cls.llm2clip}
        if name not in presets:
            raise ValueError(f"unknown adapter preset {name!r}; known: {', '.join(presets)}")
        return presets[name](in_dim, out_dim, dropout)


class ResidualBlock(nn.Module):
    """``x + W2(Dropout(GELU(W1(LN(x)))))`` — pre-norm, so the identity path stays untouched."""

    def __init__(self, dim: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.dropout(self.act(self.fc1(self.norm(x)))))


class Adapter(nn.Module):
    """The adapter ``g``: L2-normalise, residual blocks, LayerNorm, Linear(→ ``out_dim``)."""

    def __init__(
        self, in_dim: int, out_dim: int, blocks: int = 1, expansion: int = 8, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.config = AdapterConfig(in_dim, out_dim, blocks, expansion, dropout)
        self.blocks = nn.Sequential(*(ResidualBlock(in_dim, expansion, dropout) for _ in range(blocks)))
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    @classmethod
    def from_config(cls, config: AdapterConfig) -> Adapter:
        return cls(config.in_dim, config.out_dim, config.blocks, config.expansion, config.dropout)

    def forward(self, embeddings: Tensor) -> Tensor:
        # Normalising first makes g blind to the embedder's output scale, which differs between
        # embedders (and between mean and last-token pooling of the same one).
        x = F.normalize(embeddings, dim=-1)
        return self.proj(self.norm(self.blocks(x)))
