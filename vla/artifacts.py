"""Artifact directories: the contract between stages.

An artifact is a directory with a `manifest.json` written last. A stage builds it in a hidden
sibling `.NAME.partial/` and renames that into place only when everything is written, so a crash
never leaves something that looks finished; the partial directory keeps the stage's checkpoints,
and a rerun of the same command resumes from them.

What a stage may write, checked by `claim_out` before any compute:
- never an input: an `--out` that is, contains or lies inside an input (or an artifact in an
  input's lineage) is refused, `--force` or not;
- `--force` replaces only a vla artifact or an empty directory, never other files;
- one writer per `--out`: the builder holds an exclusive `flock` on the sibling `.NAME.lock`
  (rank 0 under torchrun); a second writer is refused, naming the process that holds it
  (vla/locks.py).
A partial whose run stopped records why in `stopped.json`, so that `open_artifact` (and so
`vla inspect`) can tell a run being built, a run that stopped and a run that was killed apart.

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
from typing import Any, Iterable, Mapping, Sequence

from vla import __version__
from vla.errors import Interrupted, StageError, UserError, VlaError
from vla.locks import describe_holder, lock_path, read_holder, release, release_all  # noqa: F401

FORMAT = "vla-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Resume state lives here while a stage runs; it is dropped when the artifact is finished, since
# a finished artifact is never resumed and optimizer state would triple its size.
CHECKPOINTS = "checkpoints"
RESUME = "resume.json"  # in a partial: the kind and recipe of the run it holds
STOPPED = "stopped.json"  # in a partial: why its run stopped
# Settings that change no result (how often to log or checkpoint, how many data workers read the
# batches, the skip limit): a rerun may change them and still resume.
NEUTRAL_SETTINGS = frozenset({"data.max_skip_fraction", "max_skip_fraction", "data.num_workers",
                              "train.log_every", "train.tensorboard", "train.checkpoint_every"})


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
    # docs/ and README.md change no result (`make` writes docs/results/ as it goes)
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--",
                            ".", ":(exclude)docs", ":(exclude)README.md"],
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
            raise UserError(unfinished(p))
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


# -- where a stage may write ------------------------------------------------------------------

def is_artifact(path: Path) -> bool:
    """Whether `path` is a finished vla artifact (a directory with a manifest of this format)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def checkpoint_step(out: Path) -> int | None:
    """The step of the training checkpoint in `out`'s partial, if it holds one."""
    ckpt = partial_dir(Path(out)) / CHECKPOINTS
    try:
        if (ckpt / "last.pt").exists():
            return int(json.loads((ckpt / "last.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def rerun_hint(out: Path) -> str:
    """What rerunning the command that builds `out` does now."""
    step = checkpoint_step(out)
    if step is not None:
        return f"rerun the same command to resume from step {step}"
    if (partial_dir(Path(out)) / RESUME).exists():
        return "no checkpoint was written yet: rerunning the same command starts it from the beginning"
    return "nothing was saved: rerunning the same command starts from the beginning"


def unfinished(out: Path) -> str:
    """One line on the state of `out`'s partial: being built now, stopped (and why), or killed."""
    holder = read_holder(out)
    if holder is not None:
        return f"{out} is being built right now ({describe_holder(holder)}); wait for it to finish"
    try:
        stopped = json.loads((partial_dir(out) / STOPPED).read_text())
        why = f"its run stopped: {stopped['reason']}"
    except (OSError, ValueError, KeyError, TypeError):
        why = "its run was killed before it finished"
    return f"{out} is unfinished ({why}); {rerun_hint(out)}"


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


_stage_t0: float | None = None


def start_stage_clock() -> None:
    """Start the running command's stage clock: the next artifact's `timings.wall_s` counts from
    here, so the work a stage does before its artifact opens (loading models, building the
    feature cache) is part of its wall time; `timings.setup_s` says how much of it that was."""
    global _stage_t0
    _stage_t0 = time.time()


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
        """Rank 0 checks `--out`, takes its writer lock and resumes or starts the partial; every
        rank then waits for it, so none reads a partial (a checkpoint) that rank 0 is about to
        replace, and every rank raises rank 0's error if it had one."""
        global _stage_t0
        now = time.time()
        self._t0, _stage_t0 = (now if _stage_t0 is None else min(_stage_t0, now)), None
        self.timings["setup_s"] = round(now - self._t0, 3)
        error = None
        if self.is_main:
            try:
                self._start()
            except Exception as e:
                error = e
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from vla.distributed import from_main

            # the message crosses, not the exception: a user error is a user error on every rank
            said = from_main(None if error is None else (isinstance(error, UserError), str(error)))
            if error is None and said is not None:
                user, message = said
                error = UserError(message) if user else StageError(f"rank 0 failed: {message}")
        if error is not None:
            release(self.out)
            raise error
        return self

    def _start(self) -> None:
        claim_out(self.out, force=self.force, inputs=self.inputs)
        # --force replaces a finished artifact; an unfinished run with the same settings is still
        # resumed (so `make`, which passes --force for stale targets, resumes after a crash too)
        state = self.dir / RESUME
        if self.dir.exists() and state.exists():
            try:
                started = json.loads(state.read_text())
            except (OSError, ValueError):
                started = {}
            diff = (f"kind {started.get('kind', '?')}" if started.get("kind") != self.kind
                    else _recipe_diff(_results_only(started.get("recipe", {})), _results_only(self.recipe))
                    or _inputs_diff(started.get("inputs") or {}, _input_digests(self.inputs)))
            if diff is None:
                self.resumed = True
                (self.dir / STOPPED).unlink(missing_ok=True)
                return
            if not self.force:
                raise UserError(f"{self.dir} holds an unfinished run with other settings ({diff}); "
                                f"rerun with the same settings to resume it, or pass --force to start over")
        try:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            state.write_text(json.dumps({"kind": self.kind, "recipe": self.recipe,
                                         "inputs": _input_digests(self.inputs)}, indent=1))
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write {self.dir} ({e.strerror}); choose an --out "
                            f"in a directory you can write to") from None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # keep the partial directory: its checkpoints let a rerun resume; say why it stopped
            if self.is_main and self.dir.is_dir():
                reason = ("interrupted (Ctrl-C)" if exc_type is KeyboardInterrupt
                          else str(exc).split(";")[0] if isinstance(exc, Interrupted)  # what follows is the rerun
                          else str(exc) if isinstance(exc, VlaError) else f"{exc_type.__name__}: {exc}")
                stopped = {"reason": reason.strip().splitlines()[0] if reason.strip() else exc_type.__name__,
                           "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
                try:
                    (self.dir / STOPPED).write_text(json.dumps(stopped, ensure_ascii=False) + "\n")
                except OSError:
                    pass
            release(self.out)
            return
        self.finish()

    # -- finishing -----------------------------------------------------------------------------
    def finish(self) -> Artifact | None:
        """Write the manifest and rename the partial into place. The resume state is removed only
        after the rename: a kill before it leaves a partial that a rerun resumes at its last step."""
        if not self.is_main:
            return None
        internal = {RESUME, STOPPED} | ({CHECKPOINTS} if not self.keep_checkpoints else set())
        outputs = {rel: sha256_file(p) for p in sorted(self.dir.rglob("*"))
                   if p.is_file() and p.name != MANIFEST
                   and (rel := str(p.relative_to(self.dir))).split("/")[0] not in internal}
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
            if not (is_artifact(self.out) or (self.out.is_dir() and not any(self.out.iterdir()))):
                raise UserError(f"{self.out} is no longer a vla artifact or an empty directory; vla does "
                                f"not replace it: the finished run is kept in {self.dir}")
            trash = self.out.parent / f".{self.out.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.out, trash)
            os.replace(self.dir, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.dir, self.out)
        for name in internal:  # resume state: a finished artifact is never resumed
            p = self.out / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        release(self.out)
        self.artifact = Artifact(self.out, manifest)
        return self.artifact


def _input_digests(inputs: Mapping[str, Any]) -> dict[str, str]:
    """Each input's content digest (an artifact's digest, raw data's digest, a file's sha256)."""
    out = {}
    for role, ref in inputs.items():
        if isinstance(ref, dict) and (digest := ref.get("digest") or ref.get("sha256")):
            out[role] = str(digest)
    return out


def _inputs_diff(old: Mapping[str, str], new: Mapping[str, str]) -> str | None:
    """How the inputs a partial was started with differ from this run's (roles both record):
    resuming would mix what was built from one input with what is built from another."""
    for role in sorted(set(old) & set(new)):
        if old[role] != new[role]:
            return f"input {role}: digest {old[role][:12]} → {new[role][:12]}"
    return None


def _results_only(recipe: Any) -> Any:
    """`recipe` without the settings that change no result (NEUTRAL_SETTINGS)."""
    def strip(d: Any, prefix: str) -> Any:
        if not isinstance(d, dict):
            return d
        return {k: strip(v, f"{prefix}{k}.") for k, v in d.items() if f"{prefix}{k}" not in NEUTRAL_SETTINGS}
    return strip(recipe, "")


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


# claim_out (vla/claim.py) checks where a stage may write; it is part of this module's interface
from vla.claim import claim_out  # noqa: E402,F401
