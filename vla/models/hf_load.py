"""Loading a transformers model offline-first, shared by the text embedders and the causal LMs.

`model_source` says what transformers should load for a model reference (a package's bundled
model, a local directory or a hub id, which offline must already be in the cache) and refuses
anything else in one line; `load_pretrained` loads the tokenizer and the model from it, with
the hub never contacted offline, turning a load failure into one line and refusing pickled
weights whose loading would run code.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch

from vla.errors import UserError
from vla.offline import is_offline


def model_source(name: str, target: str) -> str:
    """What transformers loads: a local directory, or a hub id (checked against the cache offline).
    `name` is what the user wrote (for messages), `target` what it resolves to."""
    if target.startswith("package:"):
        package = target.removeprefix("package:")
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            dist = package.replace("_", "-")
            raise UserError(f"{name} needs the PyPI package {dist}: pip install {dist} (or vla[embedders])") from err
        return str(Path(module.__file__).parent / "model")
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{name}: {path} has no config.json; pass a transformers model directory")
        return str(path)
    if path.exists() or target.startswith((".", "/", "~")) or target.count("/") != 1:
        raise UserError(f"{name}: no model directory {target} and not a hub id ORG/NAME")
    if is_offline() and hub_snapshot(target) is None:
        raise UserError(
            f"{name} ({target}) is not available offline; download it once with network "
            f"(HF_HUB_OFFLINE=0 vla ...), point HF_HOME at a cache holding it, or pass its local directory"
        )
    return target


def hub_snapshot(repo: str) -> Path | None:
    """The cached snapshot directory of a hub model, if its config is in the cache."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def local_files(source: str) -> Path | None:
    """The directory holding a source's files: itself, or its hub snapshot (None if not cached)."""
    path = Path(source)
    return path if path.is_dir() else hub_snapshot(source)


def load_pretrained(name: str, source: str, auto_model: str, *, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False, what: str = "") -> tuple[Any, Any]:
    """(model, tokenizer) of `source` through transformers' `auto_model` class (e.g. "AutoModel")
    and `AutoTokenizer`, from local files only when offline; UserError naming `name` if they
    cannot be loaded. `what` qualifies the message (" as a causal LM"). transformers is imported
    here, after `model_source` has had its say: its import alone takes seconds."""
    import transformers
    from transformers import AutoTokenizer

    options = dict(local_files_only=is_offline(), trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = getattr(transformers, auto_model).from_pretrained(source, dtype=dtype, **options)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{name}: cannot load {source}{what} ({first})") from err
    except pickle.UnpicklingError as err:  # torch's message advises running the pickle: never relay it
        raise UserError(f"{name}: {source} holds pickled weights that would run code to load; vla loads "
                        f"safetensors or plain-tensor files only: convert them to model.safetensors") from err
    return model, tokenizer
