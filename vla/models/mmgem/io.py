"""An MM-GEM model built from names, and on disk: `build_mmgem` (an open_clip image tower and a causal
LM), `save_mmgem` (``mmgem.json``, ``mmgem.safetensors`` and the LM in transformers' layout under
``lm/``) and `load_mmgem`, which rebuilds it, refusing another format or a tokenizer without the
recorded mode tokens before any weight is read."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import torch

from vla.errors import UserError
from vla.models.mmgem.causal_lm import TinyLlamaSize, check_mode_tokens
from vla.models.mmgem.model import MMGEM, MMGEMConfig
from vla.models.weights import load_state_dict, save_state_dict


def build_mmgem(
    vision: str = "vla-micro-clip",
    llm: str | None = None,
    captions: Sequence[str] = (),
    config: MMGEMConfig = MMGEMConfig(),
    seed: int = 0,
    lm_size: TinyLlamaSize | None = None,
) -> MMGEM:
    """An MM-GEM from names: an open_clip image tower (`vla.models.clip.load_clip` grammar) and a
    causal LM (`vla.models.mmgem.causal_lm.load_causal_lm`), or — ``llm=None`` — the embedded default's
    tiny Llama (of ``lm_size``) with a tokenizer trained on ``captions``. Only the CLIP's image
    tower is kept."""
    from vla.models.mmgem.causal_lm import build_tiny_llama, load_causal_lm
    from vla.models.clip import load_clip

    clip = load_clip(vision)
    if llm is None:
        if not captions:
            raise UserError("the embedded default LM trains its tokenizer on captions; pass some")
        lm, tokenizer = build_tiny_llama(captions, lm_size or TinyLlamaSize(), seed=seed)
    else:
        lm, tokenizer = load_causal_lm(llm)
    vision_spec = {"model_cfg": clip.model_cfg, "preprocess_cfg": clip.spec["preprocess_cfg"]}
    return MMGEM(clip.model.visual, lm, tokenizer, config, clip.preprocess, seed, vision_spec)


# ---------------------------------------------------------------------------------------------
# On disk
# ---------------------------------------------------------------------------------------------

FORMAT = "vla-mmgem"
FORMAT_VERSION = 1
CONFIG_FILE = "mmgem.json"
WEIGHTS_FILE = "mmgem.safetensors"  # the tower, h1..h4 and the logit scale
LM_DIR = "lm"  # the LM and its tokenizer in transformers' layout (save_pretrained, safetensors)


def save_mmgem(model: MMGEM, out_dir: str | Path) -> Path:
    """Write ``mmgem.json``, ``mmgem.safetensors`` and ``lm/``.

    ``lm/`` is what ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer`` load — the
    mode tokens and trained soft prompts included (they are merged into the table first).
    """
    if model.vision_spec is None:
        raise UserError("this MM-GEM model has no vision_spec (open_clip model_cfg); build it with build_mmgem")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.merge_soft_prompts()
    model.lm.save_pretrained(out / LM_DIR)
    model.tokenizer.save_pretrained(out / LM_DIR)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("lm.")}
    save_state_dict(own, out / WEIGHTS_FILE)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "vision": model.vision_spec,
        "tokens": model.token_ids,
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_mmgem(path: str | Path, *, device: str = "cpu") -> MMGEM:
    """Rebuild what `save_mmgem` wrote; UserError for another format or a tokenizer without the
    recorded mode tokens (checked before the weights are read)."""
    from open_clip.model import _build_vision_tower
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    meta_file = directory / CONFIG_FILE
    if not meta_file.is_file():
        raise UserError(f"{directory}: no {CONFIG_FILE}; pass a directory that save_mmgem (or vla export) wrote")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{meta_file}: format {meta.get('format')} v{meta.get('format_version')}, "
            f"expected {FORMAT} v{FORMAT_VERSION}; re-export it with this vla version"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory / LM_DIR, local_files_only=True)
    check_mode_tokens(tokenizer, dict(meta["tokens"]), str(directory / LM_DIR))
    lm = AutoModelForCausalLM.from_pretrained(directory / LM_DIR, local_files_only=True, dtype=torch.float32)
    model_cfg = meta["vision"]["model_cfg"]
    visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg.get("quick_gelu", False))
    known = {f.name for f in dataclasses.fields(PreprocessCfg)}
    preprocess_cfg = PreprocessCfg(**{k: v for k, v in meta["vision"]["preprocess_cfg"].items() if k in known})
    preprocess = image_transform_v2(preprocess_cfg, is_train=False)
    model = MMGEM(visual, lm, tokenizer, MMGEMConfig(**meta["config"]), preprocess, vision_spec=meta["vision"])
    missing, unexpected = model.load_state_dict(load_state_dict(directory / WEIGHTS_FILE), strict=False)
    missing = [k for k in missing if not k.startswith("lm.")]
    if missing or unexpected:
        raise UserError(f"{directory / WEIGHTS_FILE} does not fit its {CONFIG_FILE} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); re-export it")
    return model.to(device).eval()
