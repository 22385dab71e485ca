"""The ProCLIP / LLM2CLIP dual encoder: a CLIP image tower and an LLM embedder Φ + adapter g.

    image → E_I(x)                   (open_clip visual tower, normalised)
    text  → norm(g(Φ(T)))            (frozen LLM embedder, trainable adapter)

On disk (a contrast-tune artifact or an export):
    model/            open_clip `local-dir` layout (open_clip_config.json + open_clip_model.safetensors)
    adapter.safetensors, adapter.json   the adapter's weights and config
    embedder.json     the embedder's spec (name, pooling, instruction, max_length); with
                      `--copy-embedder` an export also holds the embedder itself in embedder/
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vla.models.proclip.adapter import Adapter, AdapterConfig
from vla.models.encoder import as_texts


class ImageTextAligner(nn.Module):
    """What contrast-tune trains: the image tower, the adapter and the logit scale, plus (for
    L_reg) the teacher image tower, frozen or EMA-updated.

    Text enters as cached embedder features `phi` (Φ is frozen), so forward never runs the LLM.
    The teacher is a submodule so that it moves with the model, is checkpointed with it (an EMA
    teacher must survive a resume) and runs inside DDP's forward; it has no trainable parameters.
    """

    def __init__(self, visual: nn.Module, adapter: Adapter, logit_scale: nn.Module,
                 teacher: nn.Module | None = None):
        super().__init__()
        self.visual = visual
        self.adapter = adapter
        self.logit_scale = logit_scale
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the trained image tower's activations (open_clip's own switch); the teacher
        runs without grad, so it has none to save. A tower that cannot is an error, not a no-op."""
        from vla.errors import UserError

        switch = getattr(self.visual, "set_grad_checkpointing", None)
        if switch is not None:
            switch(enable)
        # open_clip's ModifiedResNet accepts the call and does nothing: check that a block took it
        if enable and not any(getattr(m, "grad_checkpointing", False) for m in self.visual.modules()):
            raise UserError(f"train.grad_checkpointing: the image tower ({type(self.visual).__name__}) cannot "
                            f"checkpoint activations; set train.grad_checkpointing=false")

    def train(self, mode: bool = True) -> "ImageTextAligner":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is a fixed target, never in training mode
        return self

    def forward(self, images: torch.Tensor, phi: torch.Tensor):
        img = F.normalize(self.visual(images), dim=-1)
        txt = F.normalize(self.adapter(phi), dim=-1)
        img_t = None
        if self.teacher is not None:
            with torch.no_grad():
                img_t = F.normalize(self.teacher(images), dim=-1)
        return img, txt, self.logit_scale(), img_t


def save_adapter(adapter: Adapter, out_dir: Path) -> None:
    from vla.models.weights import save_state_dict

    save_state_dict(adapter.state_dict(), out_dir / "adapter.safetensors")
    (out_dir / "adapter.json").write_text(json.dumps(dataclasses.asdict(adapter.config), indent=1))


def load_adapter(path: Path) -> Adapter:
    from vla.models.weights import load_state_dict

    adapter = Adapter.from_config(AdapterConfig(**json.loads((path / "adapter.json").read_text())))
    adapter.load_state_dict(load_state_dict(path / "adapter.safetensors"))
    return adapter.eval()


# Φ(text) by (embedder digest, text): the frozen embedder gives the same features to every model
# that shares it, so `vla eval` comparing ProCLIP with LLM2CLIP runs the LLM over the texts once.
_PHI_MEMO: dict[tuple[str, str], torch.Tensor] = {}


def frozen_text_features(embedder, texts: Sequence[str]) -> torch.Tensor:
    ident = embedder.digest()
    missing = [t for t in dict.fromkeys(texts) if (ident, t) not in _PHI_MEMO]
    if missing:
        for text, feat in zip(missing, embedder.embed(missing)):
            _PHI_MEMO[(ident, text)] = feat
    return torch.stack([_PHI_MEMO[(ident, t)] for t in texts])


class ProCLIPModel:
    """A ProCLIP / LLM2CLIP dual encoder (implements `DualEncoder`, vla/models/encoder.py):

        image → open_clip image tower → normalise
        text  → frozen LLM embedder Φ → adapter g → normalise

    `vla.load(path)` returns one. Its image side is the exported open_clip model (`.clip`), so
    `preprocess` is open_clip's; its text side reads texts far longer than CLIP's 77 tokens, up
    to the embedder's `text_context_length`.
    """

    def __init__(self, clip, embedder, adapter: Adapter, name: str = "proclip"):
        self.clip = clip            # vla.models.clip.ClipModel (its image side is used)
        self.embedder = embedder    # vla.models.embedder.TextEmbedder (frozen)
        self.adapter = adapter.eval()
        self.name = name
        self.text_context_length = embedder.max_length
        self.embed_dim = adapter.config.out_dim
        #: where the model came from: "kind path" lines, set by `vla.load` (indented by depth)
        self.lineage: list[str] = []

    @property
    def preprocess(self):
        """open_clip's eval transform of the image tower: PIL image → (3, H, W) tensor."""
        return self.clip.preprocess

    def to(self, device: str | torch.device) -> "ProCLIPModel":
        """Move the CLIP, the embedder and the adapter; encode_* still return CPU tensors."""
        self.clip.to(device)
        self.embedder.model.to(device)
        self.adapter.to(device)
        return self

    def tokenize(self, texts: str | Sequence[str]):
        """The embedder's tokenizer, at its own context (the text side reads long captions)."""
        return self.embedder.tokenizer(as_texts(texts), padding=True, truncation=True,
                                       max_length=self.embedder.max_length, return_tensors="pt")

    def encode_image(self, images: Image.Image | Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """(N, D) float32 L2-normalised image embeddings on the CPU, from one PIL image, a list
        of them, or a (N, 3, H, W) tensor already passed through `preprocess`."""
        return self.clip.encode_image(images)

    @torch.no_grad()
    def encode_text_features(self, phi: torch.Tensor) -> torch.Tensor:
        """Embedder features Φ(T) (N, d_Φ) → (N, D) normalised text embeddings through the
        adapter, computed on the adapter's device."""
        device = next(self.adapter.parameters()).device
        return F.normalize(self.adapter(phi.to(device, torch.float32)), dim=-1).float().cpu()

    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, D) float32 L2-normalised text embeddings on the CPU, from one string or a list;
        each text is read up to `text_context_length` embedder tokens."""
        return self.encode_text_features(frozen_text_features(self.embedder, as_texts(texts)))

    def text_token_counts(self, texts: str | Sequence[str]) -> list[int]:
        """Embedder tokens each text needs before truncation."""
        return self.embedder.token_counts(as_texts(texts))

    def __repr__(self) -> str:
        a, e = self.adapter.config, self.embedder
        lines = [f"ProCLIPModel(name={self.name!r}, embed_dim={self.embed_dim})",
                 f"  image: open_clip {self.clip.describe_image_tower()}",
                 f"  text:  embedder {e.name} ({e.config.pooling} pooling, ≤{e.max_length} tokens, "
                 f"{e.dim}-d) → adapter ({a.blocks} block{'s' if a.blocks > 1 else ''} ×{a.expansion}, "
                 f"{a.in_dim}→{a.out_dim})"]
        if self.lineage:
            lines += ["  lineage:"] + [f"    {line}" for line in self.lineage]
        return "\n".join(lines)


def embedder_from_spec(path: Path, device: str | torch.device = "cpu"):
    """Load the embedder a directory names in embedder.json (or holds in embedder/)."""
    from vla.models.embedder import load_embedder

    spec = json.loads((path / "embedder.json").read_text())
    source = str(path / "embedder") if (path / "embedder").is_dir() else spec["name"]
    return load_embedder(source, pooling=spec.get("pooling"), instruction=spec.get("instruction"),
                         max_length=spec.get("max_length"), device=device)


def load_proclip_dir(path: Path, name: str | None = None, model_dir: Path | None = None) -> ProCLIPModel:
    """A contrast-tune artifact (CLIP in model/) or an export (CLIP at the top level)."""
    from vla.models.clip import load_clip

    path = Path(path)
    clip = load_clip("local-dir:" + str(model_dir or path / "model"))
    return ProCLIPModel(clip, embedder_from_spec(path), load_adapter(path), name=name or path.name)
