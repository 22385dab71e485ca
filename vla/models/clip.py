"""CLIP models through open_clip, behind the `DualEncoder` interface.

Names (see `vla.models.registry` for the whole grammar):
- `clip-vit-l`, `clip-vit-b-16`, `clip-vit-b-32`: OpenAI weights; `ARCH:TAG`: any open_clip pair;
- `vla-tiny-clip`, `vla-micro-clip`, or any bare open_clip `ARCH`: random init, no download;
- `local-dir:PATH` or a directory: open_clip's own layout (`open_clip_config.json` holding
  `model_cfg` + `preprocess_cfg`, beside `open_clip_model.safetensors`) — what `save_clip` writes;
- `ARCH@FILE`: a bare weights file (safetensors, or a weights-only `.pt` such as open_clip's
  training `epoch_N.pt`) loaded strictly into architecture ARCH. A file alone does not say its
  architecture, hence the `@`. OpenAI-trained weights need the `-quickgelu` variant of ARCH.
- `hf-hub:ORG/REPO`: an open_clip repository on the Hugging Face hub.

Where each name's config and weights come from (the local caches first, so a model missing offline
is a UserError at once instead of a download attempt) is `vla.models.clip_names`.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from vla.errors import UserError
from vla.models.clip_names import (CONFIG_DIR, CONFIG_FILE, WEIGHTS_FILE, ClipSpec, hf_hub_contents,  # noqa: F401
                                   local_dir_contents, parse_clip_name, pretrained_file, register_vla_configs)
from vla.models.encoder import as_images, as_texts, inference
from vla.models.weights import load_state_dict, refused_pickle_message, save_state_dict

#: open_clip's precisions; fp32 on CPU (bf16 is emulated there and far slower)
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")


class ClipModel:
    """An open_clip model with its preprocessing and tokenizer; implements `DualEncoder`.

    `model` is the open_clip `CLIP` module itself, `preprocess` its eval transform and
    `tokenizer` its tokenizer, so anything open_clip offers stays reachable.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        source: ClipSpec,
        model_cfg: dict[str, Any],
        weights_file: str | None,
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.source = source
        self.model_cfg = model_cfg
        self.weights_file = weights_file
        self.name = source.name
        self.text_context_length: int | None = int(model_cfg["text_cfg"].get("context_length", 77))
        self.embed_dim = int(model_cfg["embed_dim"])
        size = model.visual.image_size
        self.image_size: int | tuple[int, int] = size[0] if isinstance(size, tuple) and size[0] == size[1] else size

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able: the name's parse, the architecture, preprocessing and the weights file used."""
        return {
            **asdict(self.source),
            "model_cfg": self.model_cfg,
            "preprocess_cfg": _jsonable(self.model.visual.preprocess_cfg),
            "weights_file": self.weights_file,
        }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train_preprocess(self, kind: str = "open_clip") -> Any:
        """The training transform: open_clip's own (RandomResizedCrop at scale 0.9–1 and aspect
        3/4–4/3 to the model's size, bicubic, its normalisation), or "eval": `preprocess`
        (resize + centre crop). Its random draws come from torch's generator, which the data
        stream seeds per sample."""
        if kind == "eval":
            return self.preprocess
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.model.visual.preprocess_cfg), is_train=True)

    def uint8_train_preprocess(self, kind: str = "open_clip") -> Any:
        """`train_preprocess` ending in a uint8 (3, H, W) tensor: the same crop and resize, without
        the float conversion and normalisation, which `normalize_uint8_inputs` then does on the
        device. A DataLoader worker hands the main process 4× fewer bytes (shared memory, copies)."""
        from torchvision import transforms as T

        steps = []
        for t in self.train_preprocess(kind).transforms:
            if isinstance(t, T.Normalize):
                continue
            steps.append(T.PILToTensor() if isinstance(t, T.ToTensor) else t)
        return T.Compose(steps)

    def normalize_uint8_inputs(self, module: torch.nn.Module | None = None) -> Any:
        """Make `module` (default: the image tower) accept uint8 pixels: a forward pre-hook turns
        them into what `train_preprocess` gives, ``(x / 255 − mean) / std``, on the input's device
        (float inputs pass unchanged). Returns the hook's handle; the weights are untouched."""
        cfg = self.model.visual.preprocess_cfg
        mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)

        def normalize(_module, args):
            x = args[0]
            if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
                return None
            x = (x.float() / 255 - mean.to(x.device)) / std.to(x.device)
            return (x, *args[1:])

        return (module if module is not None else self.model.visual).register_forward_pre_hook(normalize)

    def to(self, device: str | torch.device) -> "ClipModel":
        """Move the whole model (both towers); encode_* still return CPU tensors."""
        self.model.to(device)
        return self

    def encode_image(self, images: Image.Image | Sequence[Image.Image] | torch.Tensor,
                     batch_size: int = 256) -> torch.Tensor:
        """(N, D) float32 L2-normalised image embeddings on the CPU.

        `images`: one PIL image, a list of them (preprocessed here with `self.preprocess`, as
        open_clip's transforms do), or a (N, 3, H, W) tensor already preprocessed.
        """
        if isinstance(images, torch.Tensor):
            pixels_in = images if images.dim() == 4 else images.unsqueeze(0)
            chunks = [pixels_in[i : i + batch_size] for i in range(0, len(pixels_in), batch_size)]
        else:
            ims = as_images(images)
            chunks = (torch.stack([self.preprocess(im) for im in ims[i : i + batch_size]])
                      for i in range(0, len(ims), batch_size))
        # the image tower's own device and dtype: a stage may have moved only that tower
        first = next(self.model.visual.parameters())
        out = []
        with inference(self.model):
            for pixels in chunks:
                feats = self.model.encode_image(pixels.to(first.device, first.dtype), normalize=True)
                out.append(feats.float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(N, D) float32 L2-normalised text embeddings on the CPU; one string or a list. Texts
        longer than `text_context_length` tokens are truncated, as open_clip's tokenizer does."""
        texts = as_texts(texts)
        out = []
        with inference(self.model):
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """open_clip's tokenizer: (N, text_context_length) token ids, one string or a list."""
        return self.tokenizer(as_texts(texts))

    def text_token_counts(self, texts: str | Sequence[str]) -> list[int]:
        """Tokens each text needs before truncation, start and end tokens included."""
        texts = as_texts(texts)
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None:  # open_clip's HFTokenizer: the HF tokenizer adds its own special tokens
            return [len(hf(self.tokenizer.clean_fn(t))["input_ids"]) for t in texts]
        return [len(self.tokenizer.encode(t)) + 2 for t in texts]  # + start and end of text

    def describe_image_tower(self) -> str:
        """`ViT 12 layers × 768, patch 32, 224 px` (or the tower's config when it is no plain ViT)."""
        v = self.model_cfg.get("vision_cfg", {})
        size = self.image_size if isinstance(self.image_size, int) else "×".join(map(str, self.image_size))
        if v.get("timm_model_name"):
            return f"timm {v['timm_model_name']}, {size} px"
        if isinstance(v.get("layers"), int) and v.get("patch_size"):
            return f"ViT {v['layers']} layers × {v.get('width')}, patch {v['patch_size']}, {size} px"
        return f"{size} px"

    def __repr__(self) -> str:
        weights = self.source.pretrained and f"{self.source.pretrained} weights" or self.weights_file or "random init"
        return (f"ClipModel(name={self.name!r}, embed_dim={self.embed_dim}, image: {self.describe_image_tower()}, "
                f"text: {self.text_context_length}-token context, weights={weights!r}, device={self.device})")


def load_clip(name: str, *, device: str = "cpu", precision: str = "fp32") -> ClipModel:
    """Build the CLIP a name denotes (see the module docstring); UserError when it cannot be had."""
    import open_clip

    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    register_vla_configs()
    spec = parse_clip_name(name)
    kwargs: dict[str, Any] = {}
    weights_file: str | None = None
    if spec.local_dir is not None:
        model_name = "local-dir:" + spec.local_dir
        model_cfg, weights_file = local_dir_contents(spec)
    elif spec.hf_hub is not None:
        model_name = "hf-hub:" + spec.hf_hub
        model_cfg, weights_file = hf_hub_contents(spec)
    else:
        assert spec.arch is not None
        model_name = spec.arch
        model_cfg = open_clip.get_model_config(spec.arch)
        if spec.pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
            weights_file = pretrained_file(spec, tag_cfg)
            # open_clip only warns when a tag's activation differs from the config: apply it.
            if tag_cfg.get("quick_gelu"):
                model_cfg["quick_gelu"] = True
            kwargs = dict(
                pretrained=weights_file,
                force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                image_mean=tag_cfg.get("mean"),
                image_std=tag_cfg.get("std"),
                image_interpolation=tag_cfg.get("interpolation"),
                image_resize_mode=tag_cfg.get("resize_mode"),
            )
    quiet = _NoRandomInitWarning()  # random init is what a small config asks for, not a problem
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, device=device, precision=precision, **kwargs
        )
    except pickle.UnpicklingError as err:  # open_clip loads .bin/.pt files weights-only too
        raise UserError(refused_pickle_message(Path(weights_file or name))) from err
    finally:
        logging.getLogger().removeFilter(quiet)
    if spec.checkpoint is not None:
        weights_file = spec.checkpoint
        _load_checkpoint(model, spec)
    if spec.local_dir is not None:  # DCLIP's tower changes (2-D RoPE, cluster pooling) recorded beside the files
        from vla.models.dclip.vision_variants import apply_variant, read_variant

        variant = read_variant(Path(spec.local_dir))
        if variant is not None:
            apply_variant(model.visual, variant)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipModel(model, preprocess, tokenizer, spec, model_cfg, weights_file)


def _load_checkpoint(model: torch.nn.Module, spec: ClipSpec) -> None:
    state = load_state_dict(spec.checkpoint or "")
    if isinstance(state.get("state_dict"), dict):  # open_clip training checkpoints (epoch_N.pt)
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UserError(
            f"{spec.name}: {spec.checkpoint} does not fit architecture {spec.arch} ({first}); "
            "name the architecture it was trained with"
        ) from err


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def save_clip(clip: ClipModel, out_dir: str | Path) -> Path:
    """Write open_clip's local-dir layout, which `create_model_and_transforms('local-dir:…')` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": clip.model_cfg, "preprocess_cfg": _jsonable(clip.model.visual.preprocess_cfg)}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    save_state_dict(clip.model.state_dict(), out / WEIGHTS_FILE)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value
