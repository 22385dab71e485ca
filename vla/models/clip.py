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

Pretrained weights are looked up in the local caches before open_clip is asked for them, so a
model missing offline is a UserError at once instead of a download attempt.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from vla.errors import UserError
from vla.models import registry
from vla.models.encoder import as_images, as_texts, inference
from vla.models.weights import load_state_dict, refused_pickle_message, save_state_dict
from vla.offline import is_offline

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
#: open_clip's precisions; fp32 on CPU (bf16 is emulated there and far slower)
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


@dataclass(frozen=True)
class ClipSpec:
    """Where a CLIP comes from, parsed from its name; exactly one weights source, or none (random)."""

    name: str
    arch: str | None = None
    pretrained: str | None = None  # an open_clip pretrained tag, e.g. "openai"
    checkpoint: str | None = None  # a weights file loaded into `arch`
    local_dir: str | None = None
    hf_hub: str | None = None

    @property
    def label(self) -> str:
        """How messages name the model: `clip-vit-l (ViT-L-14, openai weights)`."""
        if self.pretrained:
            return f"{self.name} ({self.arch}, {self.pretrained} weights)"
        return self.name


def register_vla_configs() -> None:
    """Make vla's small configs (vla/models/configs/*.json) open_clip model names; idempotent."""
    import open_clip

    if "vla-micro-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def parse_clip_name(name: str) -> ClipSpec:
    """Turn a name into a ClipSpec; UserError for a malformed or unknown one (no weights touched)."""
    alias = registry.alias(name)
    if alias is not None and alias.kind != "clip":
        raise UserError(f"{name} is a {alias.kind}, not a CLIP; pass a CLIP name such as clip-vit-l")
    target = alias.target if alias else name
    if target.startswith("local-dir:"):
        return ClipSpec(name, local_dir=target.removeprefix("local-dir:"))
    if target.startswith("hf-hub:"):
        return ClipSpec(name, hf_hub=target.removeprefix("hf-hub:"))
    if "@" in target:
        arch, checkpoint = target.split("@", 1)
        return ClipSpec(name, arch=_checked_arch(arch, name), checkpoint=checkpoint)
    if Path(target).is_dir():
        return ClipSpec(name, local_dir=target)
    if target.endswith(_CHECKPOINT_SUFFIXES):
        raise UserError(
            f"{target} is a weights file without its architecture; name it as ARCH@{target} "
            f"(e.g. ViT-B-32@{target}, vla-tiny-clip@{target})"
        )
    if "/" in target or target.startswith(("~", ".")):  # no open_clip name has a "/": a path was meant
        raise UserError(f"{name}: no such path; a CLIP is a registry name (vla models), an open_clip "
                        f"ARCH[:TAG], hf-hub:ORG/REPO, ARCH@FILE or an existing directory")
    arch, _, tag = target.partition(":")
    arch = _checked_arch(arch, name)
    if tag:
        import open_clip

        if not open_clip.get_pretrained_cfg(arch, tag):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise UserError(f"open_clip has no pretrained tag {tag!r} for {arch} (known: {tags})")
        return ClipSpec(name, arch=arch, pretrained=tag)
    return ClipSpec(name, arch=arch)


def _checked_arch(arch: str, name: str) -> str:
    import open_clip

    register_vla_configs()
    if arch not in open_clip.list_models():
        raise UserError(
            f"{name}: {arch!r} is not an open_clip architecture; see open_clip.list_models() "
            f"or use an alias ({', '.join(a for a, v in registry.ALIASES.items() if v.kind == 'clip')})"
        )
    return arch


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
        model_cfg, weights_file = _local_dir_contents(spec)
    elif spec.hf_hub is not None:
        model_name = "hf-hub:" + spec.hf_hub
        model_cfg, weights_file = _hf_hub_contents(spec)
    else:
        assert spec.arch is not None
        model_name = spec.arch
        model_cfg = open_clip.get_model_config(spec.arch)
        if spec.pretrained:
            tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
            weights_file = _pretrained_file(spec, tag_cfg)
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


def _local_dir_contents(spec: ClipSpec) -> tuple[dict[str, Any], str]:
    directory = Path(spec.local_dir or "")
    if not directory.exists():
        raise UserError(f"{spec.name}: no such path {directory}")
    config = directory / CONFIG_FILE
    if not config.is_file():
        raise UserError(
            f"{spec.name}: {config} not found; a CLIP directory needs open_clip's layout "
            f"({CONFIG_FILE} + {WEIGHTS_FILE}), as `vla export` and save_clip write it"
        )
    model_cfg = json.loads(config.read_text()).get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise UserError(f"{spec.name}: {config} has no model_cfg; it is not an open_clip config")
    from open_clip.factory import _find_checkpoint_in_dir

    weights = _find_checkpoint_in_dir(directory)
    if weights is None:
        raise UserError(f"{spec.name}: no weights (*.safetensors, *.bin, *.pth) in {directory}")
    return model_cfg, weights


def _hf_hub_contents(spec: ClipSpec) -> tuple[dict[str, Any], str | None]:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = spec.hf_hub or ""
    if is_offline():
        config = try_to_load_from_cache(repo, CONFIG_FILE)
        weights = _cached_hub_file(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
        if not isinstance(config, str) or weights is None:
            raise UserError(_offline_message(spec))
    else:
        config = hf_hub_download(repo, CONFIG_FILE)
        weights = None  # open_clip downloads them
    return json.loads(Path(config).read_text())["model_cfg"], weights


def _pretrained_file(spec: ClipSpec, tag_cfg: dict[str, Any]) -> str:
    """The local file of an open_clip pretrained tag, found the way open_clip would download it."""
    hub = tag_cfg.get("hf_hub", "")
    if hub:  # open_clip prefers the hub when a tag has both
        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename]
        # open_clip first tries a safetensors twin of a .bin/.pth file
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, WEIGHTS_FILE)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        found = _cached_hub_file(repo, candidates)
    else:
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        found = str(cached) if cached.is_file() else None
    if found is not None:
        return found
    if is_offline():
        raise UserError(_offline_message(spec))
    import open_clip

    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # network, missing repo: one line for the user
        raise UserError(f"{spec.label}: download failed ({err}); check the network or pass a local copy") from err


def _cached_hub_file(repo: str, filenames: list[str]) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def _offline_message(spec: ClipSpec) -> str:
    file_form = f" or {spec.arch}@/path/weights.safetensors" if spec.arch else ""
    return (
        f"{spec.label} is not available offline; download it once with network "
        f"(HF_HUB_OFFLINE=0 vla ...) or pass a local checkpoint instead of the name: local-dir:/path{file_form}"
    )


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
