"""Where a stage may write, checked by `claim_out` before any compute, with one line naming the
problem: never over an input (an `--out` that is, contains or lies inside an input or an artifact
in an input's lineage); `--force` replaces only a vla artifact or an empty directory; then the
`--out`'s writer lock (vla/locks.py) is taken. `vla.artifacts` re-exports `claim_out`;
`ArtifactBuilder` calls it on entry."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from vla.errors import UserError
from vla.locks import acquire


def _input_paths(inputs: Mapping[str, Any]) -> list[tuple[str, Path]]:
    """(what, resolved path) of each input that exists on disk, and of each artifact recorded in
    its lineage. Inputs: `Artifact`s, reference dicts (`{"path", ...}`), or plain paths or model
    names (a name that is no path on disk is not a place vla could overwrite)."""
    from vla.artifacts import MANIFEST, Artifact, is_artifact, lineage  # here: vla.artifacts imports this module

    found: list[tuple[str, Path]] = []

    def add(what: str, ref: Any) -> None:
        if ref is None or ref == "":
            return
        path = Path(str(ref)).expanduser()
        if path.exists():
            found.append((what, path.resolve()))
        else:  # a shard specification (`W/train/{00000..00009}.tar`): its shards' directories, as --data W/train
            found.extend((what, d) for d in _shard_spec_dirs(str(ref)))

    for role, ref in inputs.items():
        if isinstance(ref, Artifact):
            path, manifest = ref.path, ref.manifest
        elif isinstance(ref, dict):
            path, manifest = ref.get("path"), ref
        else:
            path, manifest = ref, None
            if path is not None and is_artifact(Path(str(path))):
                manifest = json.loads((Path(str(path)) / MANIFEST).read_text())
        add(role, path)
        for _, ancestor, r in lineage(manifest or {}):
            add(f"{ancestor} (in the lineage of {role})", r.get("path"))
    return found


def _shard_spec_dirs(spec: str) -> list[Path]:
    """The directories holding the local files a shard specification names (brace ranges, `::`
    lists, globs, as `--data` takes them); none for anything else."""
    import glob
    from urllib.parse import urlparse

    if not any(c in spec for c in "{*?[") and "::" not in spec:
        return []
    try:
        from webdataset.shardlists import expand_urls

        urls = expand_urls(spec)
    except Exception:  # not a specification webdataset reads: nothing local to protect
        return []
    dirs: dict[Path, None] = {}
    for url in urls:
        if urlparse(url).scheme not in ("", "file"):
            continue
        local = url.removeprefix("file://").removeprefix("file:")
        for m in (glob.glob(local) if glob.has_magic(local) else [local]):
            if Path(m).is_file():
                dirs[Path(m).resolve().parent] = None
    return list(dirs)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def claim_out(out: str | Path, *, force: bool, inputs: Mapping[str, Any] | None = None) -> None:
    """Refuse an `--out` this stage must not write, before any compute, with one line naming it;
    then (on rank 0) take the `--out`'s writer lock, held until the artifact is finished.

    Refused: an existing file; a parent that is a file or not writable; an `--out` that is,
    contains or lies inside an input or its lineage; a finished artifact without `--force`; a
    directory with content that is not a vla artifact, even with `--force` (vla deletes only what
    it made). Calling it again in the same process re-checks and keeps the lock."""
    from vla.artifacts import MANIFEST, is_artifact, partial_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; --out names a directory for the artifact: "
                        f"choose another path")
    anchor = _nearest_existing(out.parent.resolve())
    if not anchor.is_dir():
        raise UserError(f"--out {out}: {anchor} is a file, not a directory; choose an --out in a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot create it, {anchor} is not writable for this user; "
                        f"choose an --out in a directory you can write to")
    target = out.resolve()
    for what, path in _input_paths(inputs or {}):
        for place in (target, partial_dir(target)):
            if place == path or path.is_relative_to(place) or place.is_relative_to(path):
                how = ("is" if place == path else "contains" if path.is_relative_to(place) else "lies inside")
                raise UserError(f"--out {out} {how} the {what} input {path}; vla never writes over its "
                                f"inputs: choose an --out outside them")
    if out.is_dir():
        if (out / MANIFEST).exists() and is_artifact(out):
            if not force:
                raise UserError(f"{out} is already a finished '{_kind_of(out)}' artifact; "
                                f"pass --force to rebuild it")
        elif any(out.iterdir()):
            entries = sorted(p.name for p in out.iterdir())
            raise UserError(f"{out} exists and is not a vla artifact ({len(entries)} entries, e.g. "
                            f"{entries[0]!r}); vla replaces only its own artifacts or an empty "
                            f"directory: choose another --out")
    if _rank() == 0:
        acquire(out)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _kind_of(out: Path) -> str:
    from vla.artifacts import MANIFEST

    try:
        return json.loads((out / MANIFEST).read_text()).get("kind", "?")
    except (OSError, ValueError):
        return "?"
