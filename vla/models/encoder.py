"""The interface every evaluable model offers: a CLIP, a ProCLIP export, a DCLIP student, MM-GEM.

`vla eval` only ever talks to this protocol, so any model that implements it can be compared with
any other in one table. As in open_clip and sentence-transformers, `encode_image` and
`encode_text` take one item or a list of them and always return a (N, D) matrix (N = 1 for one
item), so `image_emb @ text_emb.T` is a score table either way.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

from PIL import Image

if TYPE_CHECKING:  # torch is not needed to name the protocol (`vla models` lists without it)
    import torch


@runtime_checkable
class DualEncoder(Protocol):
    name: str
    #: the text side's context in tokens, or None when it reads any length (an LLM embedder)
    text_context_length: int | None

    def encode_image(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) float32 L2-normalised image embeddings, on the CPU."""

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised text embeddings, on the CPU (truncating at the context)."""

    def text_token_counts(self, texts: str | Sequence[str]) -> list[int]:
        """Tokens each text needs before truncation (to report where the text side truncated)."""


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """One text or several as a list. A bare string is one text: iterating it would give one
    "text" per character, the trap `encode_text("a cat")` otherwise falls into."""
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    if not all(isinstance(t, str) for t in out):
        kinds = sorted({type(t).__name__ for t in out if not isinstance(t, str)})
        raise TypeError(f"encode_text takes a string or a list of strings, got a list holding {', '.join(kinds)}")
    return out


def as_images(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    """One PIL image or several as a list."""
    if isinstance(images, Image.Image):
        return [images]
    out = list(images)
    if not all(isinstance(im, Image.Image) for im in out):
        kinds = sorted({type(im).__name__ for im in out if not isinstance(im, Image.Image)})
        raise TypeError(f"encode_image takes a PIL image, a list of them or a (N, 3, H, W) tensor of "
                        f"preprocessed pixels, got a list holding {', '.join(kinds)}")
    return out


@contextlib.contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """How every `encode_*` runs its network: eval mode without grad, fp32 linears on the CPU
    through oneDNN (`vla.models.onednn_linear`), then the caller's mode back (a training stage may
    be mid-epoch)."""
    import torch

    from vla.models.onednn_linear import onednn_linears

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), onednn_linears(model):
            yield
    finally:
        model.train(was_training)
