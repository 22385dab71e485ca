"""Artifact directories: the contract between stages.

An artifact is a directory with a `manifest.json` written last. A stage builds it in a hidden
sibling `.NAME.partial/` and renames that into place only when everything is written, so a crash
never leaves something that looks finished; the partial directory keeps the stage's checkpoints,
and a rerun of the same command resumes from them.

    with ArtifactBuilder(out, "pretrain", recipe=cfg, inputs={"data": data}) as art:
        ...write files into art.dir...
        art.metrics["eval"] = {...}
    # -> out/manifest.json exists, out/ is complete

A consumer opens its inputs with `open_artifact(path, expect="distill")`, which refuses a
directory of the wrong kind or a newer format before any compute is spent.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from vla import __version__
from vla.errors import UserError

FORMAT = "vla-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Resume state lives here while a stage runs; it is dropped when the artifact is finished, since
# a finished artifact is never resumed and optimizer state would triple its size.
CHECKPOINTS = "checkpoints"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def partial_dir(out: Path) -> Path:
    """Where `out` is built: a hidden sibling, on the same filesystem so the final rename is atomic."""
    return out.parent / f".{out.name}.partial"


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the vla source tree, or None when vla is not run from a git checkout."""
    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


@dataclass
class Artifact:
    """A finished artifact directory and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def digest(self) -> str:
        return self.manifest["digest"]

    @property
    def recipe(self) -> dict[str, Any]:
        return self.manifest.get("recipe", {})

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            raise UserError(f"{self.path} ({self.kind}) lacks {name}; the artifact is damaged, rebuild it with --force")
        return p

    def reference(self) -> dict[str, Any]:
        """What a consumer records about this input: enough to draw the lineage without it."""
        return {"path": str(self.path), "kind": self.kind, "digest": self.digest,
                "created": self.manifest.get("created"), "inputs": self.manifest.get("inputs", {})}


def _kinds(expect: str | Sequence[str] | None) -> tuple[str, ...]:
    if expect is None:
        return ()
    return (expect,) if isinstance(expect, str) else tuple(expect)


def open_artifact(path: str | Path, expect: str | Sequence[str] | None = None, *,
                  role: str = "input") -> Artifact:
    """Open a finished artifact, refusing anything else with a one-line message.

    Checked before any compute: the directory exists, has a complete manifest of this format,
    a version this vla reads, and (if `expect` is given) one of the expected kinds.
    """
    p = Path(path)
    kinds = _kinds(expect)
    want = " or ".join(f"'{k}'" for k in kinds) or "a vla"
    if not p.exists():
        if partial_dir(p).exists():
            raise UserError(f"{p} is unfinished (its stage was interrupted); rerun that stage to resume it")
        raise UserError(f"{p} does not exist; {role} expects {want} artifact — run the stage that makes it first")
    mpath = p / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{p} is not a vla artifact (no {MANIFEST}); {role} expects {want} artifact")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON ({e.msg}); the artifact is damaged, rebuild it with --force")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{p} is not a vla artifact (manifest format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{p} has artifact format version {version}, this vla {__version__} reads up to "
                        f"{FORMAT_VERSION}; upgrade vla (pip install -U vla) to read it")
    if kinds and manifest.get("kind") not in kinds:
        raise UserError(f"{p} is a '{manifest.get('kind')}' artifact; {role} expects {want}")
    return Artifact(p, manifest)


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON; null says "not defined"
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def _recipe_diff(old: dict, new: dict, prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if d := _recipe_diff(a, b, f"{prefix}{key}."):
                return d
        elif a != b:
            return f"{prefix}{key}: {a!r} → {b!r}"
    return None


class ArtifactBuilder:
    """Build one artifact atomically; see the module docstring.

    `inputs` maps a role ("data", "init", "teacher", ...) to an `Artifact` or to a plain
    reference dict (`{"path", "kind": "data", "digest"}`) for raw data that is not an artifact.
    """

    def __init__(self, out: str | Path, kind: str, *, recipe: Any,
                 inputs: dict[str, Artifact | dict[str, Any]] | None = None, force: bool = False,
                 command: Sequence[str] | None = None, keep_checkpoints: bool = False):
        self.out = Path(out)
        self.kind = kind
        self.recipe = _jsonable(recipe)
        self.inputs = {role: (a.reference() if isinstance(a, Artifact) else _jsonable(a))
                       for role, a in (inputs or {}).items()}
        self.force = force
        self.command = list(command if command is not None else sys.argv)
        self.keep_checkpoints = keep_checkpoints
        self.dir = partial_dir(self.out)
        self.counts: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.resumed = False
        self.artifact: Artifact | None = None  # set once finished (on rank 0)
        # Under torchrun every rank runs the stage, but only rank 0 writes and finishes the
        # artifact; the other ranks train in lock-step and return no artifact.
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self._t0 = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "ArtifactBuilder":
        if (self.out / MANIFEST).exists() and not self.force:
            raise UserError(f"{self.out} is already a finished '{self._existing_kind()}' artifact; "
                            f"pass --force to rebuild it")
        if self.out.exists() and not (self.out / MANIFEST).exists() and any(self.out.iterdir()):
            if not self.force:
                raise UserError(f"{self.out} exists and is not a vla artifact; choose another --out or "
                                f"pass --force to replace it")
        self._t0 = time.time()
        if not self.is_main:  # rank 0 alone touches the filesystem
            return self
        # --force replaces a finished artifact; an interrupted run with the same settings is still
        # resumed (so `make`, which passes --force for stale targets, resumes after a crash too)
        state = self.dir / "resume.json"
        if self.dir.exists() and state.exists():
            started = json.loads(state.read_text())
            if started.get("kind") == self.kind and started.get("recipe") == self.recipe:
                self.resumed = True
                return self
            if not self.force:
                what = ("kind " + started.get("kind", "?") if started.get("kind") != self.kind
                        else _recipe_diff(started.get("recipe", {}), self.recipe))
                raise UserError(f"{self.dir} holds an interrupted run with other settings ({what}); "
                                f"rerun with the same settings to resume it, or pass --force to start over")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        state.write_text(json.dumps({"kind": self.kind, "recipe": self.recipe}, indent=1))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return  # keep the partial directory: its checkpoints let a rerun resume
        self.finish()

    def _existing_kind(self) -> str:
        try:
            return json.loads((self.out / MANIFEST).read_text()).get("kind", "?")
        except (OSError, json.JSONDecodeError):
            return "?"

    # -- finishing -----------------------------------------------------------------------------
    def finish(self) -> Artifact | None:
        if not self.is_main:
            return None
        if not self.keep_checkpoints:
            shutil.rmtree(self.dir / CHECKPOINTS, ignore_errors=True)
        (self.dir / "resume.json").unlink(missing_ok=True)
        outputs = {str(p.relative_to(self.dir)): sha256_file(p)
                   for p in sorted(self.dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
        digest = hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()
        self.timings.setdefault("wall_s", round(time.time() - self._t0, 3))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "vla_version": __version__,
            "git_commit": git_commit(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
            "recipe": self.recipe,
            "inputs": self.inputs,
            "outputs": outputs,
            "digest": digest,
            "counts": _jsonable(self.counts),
            "metrics": _jsonable(self.metrics),
            "timings": _jsonable(self.timings),
            "resumed": self.resumed,
            **_jsonable(self.extra),
        }
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, self.dir / MANIFEST)
        if self.out.exists():  # --force: the old artifact goes only once the new one is complete
            trash = self.out.parent / f".{self.out.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.out, trash)
            os.replace(self.dir, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.dir, self.out)
        self.artifact = Artifact(self.out, manifest)
        return self.artifact


def verify(art: Artifact) -> list[str]:
    """Re-hash every output file; return the problems found (empty when intact)."""
    problems = []
    for name, want in art.manifest.get("outputs", {}).items():
        p = art.path / name
        if not p.is_file():
            problems.append(f"missing: {name}")
        elif sha256_file(p) != want:
            problems.append(f"changed: {name}")
    return problems


def lineage(ref: dict[str, Any]) -> Iterable[tuple[int, str, dict[str, Any]]]:
    """Walk a manifest's recorded inputs depth-first: (depth, role, reference)."""
    def walk(inputs: dict[str, Any], depth: int):
        for role, r in inputs.items():
            yield depth, role, r
            yield from walk(r.get("inputs", {}) or {}, depth + 1)
    yield from walk(ref.get("inputs", {}), 0)

