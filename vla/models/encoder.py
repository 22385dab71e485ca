"""The interface every evaluable model offers: a CLIP, a ProCLIP export, a DCLIP student, MM-GEM.

`vla eval` only ever talks to this protocol, so any model that implements it can be compared with
any other in one table.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class DualEncoder(Protocol):
    name: str
    #: the text side's context in tokens, or None when it reads any length (an LLM embedder)
    text_context_length: int | None

    def encode_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 L2-normalised image embeddings, on the CPU."""

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised text embeddings, on the CPU (truncating at the context)."""

    def text_token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs before truncation (to report where the text side truncated)."""
