"""Where a CLIP name's model comes from: the name parsed into a `ClipSpec` (one weights source, or
none for a random init) and the config and weights file each source gives, found in the local
caches before open_clip is asked for them, so that a model missing offline is a UserError at once
instead of a download attempt. `vla.models.clip.load_clip` builds the model from them; the names
are described there and in `vla.models.registry`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla.errors import UserError
from vla.models import registry
from vla.models.available import cached_hub_file
from vla.offline import is_offline

CONFIG_DIR = Path(__file__).parent / "configs"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
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


def local_dir_contents(spec: ClipSpec) -> tuple[dict[str, Any], str]:
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


def hf_hub_contents(spec: ClipSpec) -> tuple[dict[str, Any], str | None]:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = spec.hf_hub or ""
    if is_offline():
        config = try_to_load_from_cache(repo, CONFIG_FILE)
        weights = cached_hub_file(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
        if not isinstance(config, str) or weights is None:
            raise UserError(offline_message(spec))
    else:
        config = hf_hub_download(repo, CONFIG_FILE)
        weights = None  # open_clip downloads them
    return json.loads(Path(config).read_text())["model_cfg"], weights


def pretrained_file(spec: ClipSpec, tag_cfg: dict[str, Any]) -> str:
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
        found = cached_hub_file(repo, candidates)
    else:
        cached = Path("~/.cache/clip").expanduser() / os.path.basename(tag_cfg["url"])
        found = str(cached) if cached.is_file() else None
    if found is not None:
        return found
    if is_offline():
        raise UserError(offline_message(spec))
    import open_clip

    try:
        return open_clip.download_pretrained(tag_cfg)
    except Exception as err:  # network, missing repo: one line for the user
        raise UserError(f"{spec.label}: download failed ({err}); check the network or pass a local copy") from err


def offline_message(spec: ClipSpec) -> str:
    file_form = f" or {spec.arch}@/path/weights.safetensors" if spec.arch else ""
    return (
        f"{spec.label} is not available offline; download it once with network "
        f"(HF_HUB_OFFLINE=0 vla ...) or pass a local checkpoint instead of the name: local-dir:/path{file_form}"
    )
