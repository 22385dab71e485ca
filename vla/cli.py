"""The `vla` command line: each command parses its options, resolves its recipe and calls one stage.

Heavy imports (torch, open_clip, transformers) happen inside the commands, so `vla --help` is fast.
Errors: a `UserError` prints one red line and exits 2, a `StageError` exits 1, anything else is
a bug and shows its traceback only with `--debug` (or VLA_DEBUG=1); `--debug` never changes the
exit code. Output piped into a command that stops reading (`vla eval ... | head`) ends quietly.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.tree import Tree

from vla import __version__
from vla.errors import Interrupted, UserError, VlaError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    name="vla",
    help="Vision-language alignment curricula (ProCLIP, with the LLM2CLIP baseline) as staged, "
         "reproducible commands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings=HELP_OPTIONS,
)
recipe_app = typer.Typer(help="Show and check recipes.", no_args_is_help=True, context_settings=HELP_OPTIONS)
app.add_typer(recipe_app, name="recipe")

class _StdoutConsole(Console):
    """stdout: a reader that stops reading (`vla eval ... | head`) got what it wanted, so that
    ends the command quietly with exit 0 (rich's default exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _stdout_closed()
        raise typer.Exit(0)


# soft_wrap: lines are never cut at the console's width, so tables and dicts piped to a file or
# a log (where rich would assume 80 columns) stay one line each; a terminal wraps them itself.
console = _StdoutConsole(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe file (see recipes/).")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                      help="Override a recipe value: --set train.lr=1e-3 (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Rebuild even if --out is a finished artifact.")
DataOpt = typer.Option(..., "--data", "-d", metavar="DATA",
                       help="A synth artifact, a .jsonl manifest, or WebDataset shards as webdataset names "
                            "them: a directory, a .tar, '/shards/{00000..00999}.tar', a glob, pipe:CMD or a URL.")
# the training loop's most used settings as flags; each is the recipe key train.<name>
StepsOpt = typer.Option(None, "--steps", help="Optimizer steps (train.steps).")
BatchOpt = typer.Option(None, "--batch-size", help="Batch per process (train.batch_size).")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate (train.lr).")


class Precision(str, Enum):
    """The training loop's precisions (vla.train.PRECISIONS), as a choice the CLI can list."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


PrecisionOpt = typer.Option(None, "--precision", help="Training precision (train.precision).")


def _train_flags(steps, batch_size, lr, precision) -> dict:
    return {"train.steps": steps, "train.batch_size": batch_size, "train.lr": lr,
            "train.precision": precision.value if precision else None}


def _debug() -> bool:
    return os.environ.get("VLA_DEBUG", "") not in ("", "0")


def handles_errors(fn: Callable) -> Callable:
    """Turn vla's errors into one red line and the right exit code (2 user, 1 run time, 128 + the
    signal for a run stopped by Ctrl-C or SIGTERM); give up this process' `--out` locks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:  # the training loop stopped on a signal and said what a rerun does
            err_console.print(f"[yellow]interrupted:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except VlaError as e:
            if _debug():
                traceback.print_exc()  # then the same line and exit code as without --debug
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:
            _stdout_closed()
            raise typer.Exit(0) from None
        except KeyboardInterrupt:  # outside the training loop, or a second Ctrl-C inside it
            from vla.artifacts import rerun_hint

            out = kwargs.get("out")
            hint = rerun_hint(Path(out)) if out else "rerun the same command to start again"
            err_console.print(f"[yellow]interrupted[/]: {hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: say so in one line; --debug shows where
            if _debug():
                traceback.print_exc()
            err_console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} "
                              f"(rerun with --debug for the traceback and report it)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        finally:
            from vla.artifacts import release_all

            release_all()

    return wrapper


def _stdout_closed() -> None:
    """The reader of our stdout went away (`| head`): the output it wanted is out, so this is a
    success. Point stdout at /dev/null so that the interpreter's final flush does not fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _check_models(refs: list) -> None:
    """Every model reference `[(role, ref, kind)]` checked at once, from file names only: all the
    missing ones in one line, before torch and the model libraries are imported."""
    from vla.models.available import check_models

    check_models(refs)


def _recipe_value(recipe: Optional[Path], set_: Optional[List[str]], key: str) -> Optional[str]:
    """A top-level or dotted recipe value as the file and `--set` give it (unvalidated), for the
    early model check; the stage validates the recipe fully."""
    for item in reversed(set_ or []):
        k, _, v = item.partition("=")
        if k.strip() == key:
            return v.strip()
    if recipe is None or not Path(recipe).is_file():
        return None
    from vla.recipes import read_yaml

    try:
        value: Any = read_yaml(recipe)
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    except VlaError:
        return None  # the stage reports a bad recipe properly
    return value if isinstance(value, str) else None


def _version(value: bool) -> None:
    if value:
        console.print(f"vla {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also VLA_DEBUG=1)."),
) -> None:
    if debug:
        os.environ["VLA_DEBUG"] = "1"
    from vla.offline import configure_offline

    configure_offline()


def _command() -> list[str]:
    return ["vla", *sys.argv[1:]]


def _load_recipe(cls, kind: str, recipe: Optional[Path], set_: Optional[List[str]], options: dict):
    """The stage's typed recipe: the file, then `--set` overrides, then the command's own options
    (`{recipe key: value}`; those not given, None or empty, are left to the recipe)."""
    from vla.recipes import load_recipe

    given = [f"{key}={value}" for key, value in options.items() if value is not None and value != ""]
    return load_recipe(cls, recipe, list(set_ or []) + given, kind=kind)


# ---------------------------------------------------------------------------------------------
@app.command()
@handles_errors
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write (e.g. data/toy)."),
    seed: Optional[int] = typer.Option(None, help="World seed (overrides the recipe)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """Generate the embedded synthetic world: shards, evaluation sets and a YOLO copy."""
    from vla.data.synth import SynthConfig
    from vla.stages.synth import run

    cfg = _load_recipe(SynthConfig, "synth", recipe, set_, {"seed": seed})
    art = run(cfg, out, force=force, command=_command())
    m = art.manifest
    console.print(f"[green]✓[/] synth → {out}  ({m['timings']['wall_s']:.1f} s)")
    _print_counts(m)


def _print_counts(m: dict) -> None:
    for key, value in m.get("counts", {}).items():
        console.print(f"  {key}: {value}")
    for key, value in m.get("metrics", {}).items():
        console.print(f"  {key}: {value}")


# ---------------------------------------------------------------------------------------------
@app.command()
@handles_errors
def pretrain(
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="CLIP to start from (registry name, name:pretrained, or a pretrain artifact)."),
    steps: Optional[int] = StepsOpt,
    batch_size: Optional[int] = BatchOpt,
    lr: Optional[float] = LrOpt,
    precision: Optional[Precision] = PrecisionOpt,
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """Train or fine-tune a CLIP with InfoNCE on image-text pairs."""
    _check_models([("--model", model or _recipe_value(recipe, set_, "model"), "clip")])
    from vla.stages.pretrain import PretrainRecipe, run

    cfg = _load_recipe(PretrainRecipe, "pretrain", recipe, set_,
                       {"model": model, **_train_flags(steps, batch_size, lr, precision)})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)


@app.command("eval")
@handles_errors
def eval_(
    models: List[str] = typer.Argument(..., help="Models to compare: registry names, artifacts or exports."),
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact or a directory of eval sets."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    sets: Optional[str] = typer.Option(None, help="Comma-separated eval sets (default: the recipe's)."),
    mode: Optional[str] = typer.Option(
        None, help="How tied scores rank: clip_benchmark (default: CLIP_benchmark's own topk), "
                   "pessimistic (ties count against the model) or expected (random tie order)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """Score models on retrieval, long-text, zero-shot, regional and captioning sets; compare them in one table."""
    _check_models([("model", ref, "clip") for ref in models if not (Path(ref) / "manifest.json").exists()])
    from vla.stages.evaluate import EvalRecipe, run

    cfg = _load_recipe(EvalRecipe, "eval", recipe, set_,
                       {"sets": f"[{sets}]" if sets else None, "mode": mode})
    art = run(cfg, models, data, out, force=force, command=_command())
    console.print((art.path / "results.md").read_text(), highlight=False)
    console.print(f"[green]✓[/] eval → {out}")


@app.command("eval-merge")
@handles_errors
def eval_merge(
    inputs: List[Path] = typer.Argument(..., help="Eval artifacts, CLIP_benchmark result JSONs, "
                                                  "or directories of them."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the merged table, chart, "
                                                      "results.json and benchmark.csv."),
) -> None:
    """Merge several `vla eval` runs (or CLIP_benchmark results) into one table, as
    `clip_benchmark build` does (its benchmark.csv is written too)."""
    from vla.evaluate.merge import merge

    files = merge(inputs, out)
    console.print(files["results.md"].read_text(), highlight=False)
    console.print(f"[green]✓[/] eval-merge → {out}")


@app.command()
@handles_errors
def distill(
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="CLIP whose text encoder is distilled (clip-vit-l, a pretrain artifact, ...)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="LLM embedder (qwen, minilm, a hub id or path)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Embedder pooling: mean | last | cls | token:<tok>."),
    steps: Optional[int] = StepsOpt,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch of captions, split over the processes (train.batch_size)."),
    lr: Optional[float] = LrOpt,
    precision: Optional[Precision] = PrecisionOpt,
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """ProCLIP stage 1: distil a CLIP text encoder into an LLM embedder + MLP adapter."""
    _check_models([("--teacher", teacher or _recipe_value(recipe, set_, "teacher") or "clip-vit-l", "clip"),
                   ("--embedder", embedder or _recipe_value(recipe, set_, "embedder.name") or "qwen", "embedder")])
    from vla.stages.distill import DistillRecipe, run

    cfg = _load_recipe(DistillRecipe, "distill", recipe, set_,
                       {"teacher": teacher, "embedder.name": embedder, "embedder.pooling": pooling,
                        **_train_flags(steps, batch_size, lr, precision)})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)
    if art is not None:  # None on torchrun ranks other than 0: rank 0 reports
        counts = art.manifest["counts"]
        console.print(f"  teacher truncated: {counts['teacher_truncated']}   embedder truncated: "
                      f"{counts['embedder_truncated']}   held-out agreement: {art.manifest['metrics']['val']}",
                      highlight=False)


@app.command("contrast-tune")
@handles_errors
def contrast_tune(
    data: str = DataOpt,
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    init: Optional[str] = typer.Option(None, "--init", help="A distill artifact, or 'random' for the LLM2CLIP baseline."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP whose image tower is tuned (default: the distill's teacher)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="LLM embedder, with --init random."),
    steps: Optional[int] = StepsOpt,
    batch_size: Optional[int] = BatchOpt,
    lr: Optional[float] = LrOpt,
    precision: Optional[Precision] = PrecisionOpt,
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """ProCLIP stage 2: contrastive tuning with self-distillation (--init random: LLM2CLIP)."""
    init_ref = init or _recipe_value(recipe, set_, "init")
    _check_models([("--clip", clip or _recipe_value(recipe, set_, "clip"), "clip"),
                   ("--init", init_ref if init_ref not in (None, "random", "distill") else None, None),
                   ("--embedder", (embedder or _recipe_value(recipe, set_, "embedder.name") or "qwen")
                    if init_ref == "random" else None, "embedder")])
    from vla.stages.contrast_tune import ContrastTuneRecipe, run

    cfg = _load_recipe(ContrastTuneRecipe, "contrast-tune", recipe, set_,
                       {"init": init, "clip": clip, "embedder.name": embedder,
                        **_train_flags(steps, batch_size, lr, precision)})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)


@app.command("joint-train")
@handles_errors
def joint_train(
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact or WebDataset shards of image-text pairs."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    vision: Optional[str] = typer.Option(None, "--vision", help="Image tower: a pretrain artifact, a registry name (clip-vit-l) or open_clip name."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Causal LM (tinyllama, a hub id or directory); default: the embedded tiny Llama."),
    objective: Optional[str] = typer.Option(None, "--objective", help="joint | embed | caption (the ablations)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """MM-GEM stage 1: one causal LM learns to embed ([EMB]) and caption ([CAP]), L = L_emb + L_gen."""
    from vla.stages.joint_train import JointTrainRecipe, run

    cfg = _load_recipe(JointTrainRecipe, "joint-train", recipe, set_,
                       {"vision": vision, "llm": llm, "objective": objective})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)


@app.command("stage2-roi")
@handles_errors
def stage2_roi(
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact or shards whose samples carry region boxes and captions."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    init: Optional[str] = typer.Option(None, "--init", help="The joint-train artifact to start from."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """MM-GEM stage 2: RoIAlign regions; trains only h3 + soft prompts (captions) and h4 (retrieval)."""
    from vla.stages.stage2_roi import Stage2RoiRecipe, run

    cfg = _load_recipe(Stage2RoiRecipe, "stage2-roi", recipe, set_, {"init": init})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)


@app.command()
@handles_errors
def export(
    src: Path = typer.Argument(..., help="A contrast-tune, pretrain, train-student, joint-train or stage2-roi artifact."),
    out: Path = typer.Option(..., "--out", "-o", help="Export directory to write."),
    copy_embedder: bool = typer.Option(False, "--copy-embedder", help="Copy the embedder's weights into the export."),
    force: bool = ForceOpt,
) -> None:
    """Write a model directory for vla.load (image tower, adapter, model card); the embedder is named, copied only with --copy-embedder."""
    from vla.export import ExportRecipe, run

    art = run(ExportRecipe(copy_embedder=copy_embedder), src, out, force=force, command=_command())
    console.print(f"[green]✓[/] export → {art.path}  ({len(art.manifest['outputs'])} files); "
                  f"load it with vla.load({str(art.path)!r})")


# ---------------------------------------------------------------------------------------------
# DCLIP: detector → regions → meta-teacher → student
@app.command("train-detector")
@handles_errors
def train_detector(
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact (its YOLO copy) or an ultralytics data .yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="ultralytics model config (yolov8n.yaml)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (overrides the recipe)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """DCLIP: train a YOLO for region proposals with ultralytics' own trainer (mAP in the manifest)."""
    from vla.stages.train_detector import TrainDetectorRecipe, run

    cfg = _load_recipe(TrainDetectorRecipe, "train-detector", recipe, set_, {"model": model, "epochs": epochs})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)
    console.print(f"  val: {art.manifest['metrics']['val']}", highlight=False)


@app.command("precompute-regions")
@handles_errors
def precompute_regions(
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact or WebDataset shards / JSONL of images."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    detector: Optional[str] = typer.Option(None, "--detector", help="'oracle', a train-detector artifact, or a YOLO .pt on disk."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Frozen CLIP whose image encoder embeds the crops (name or pretrain artifact)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """DCLIP: detect regions, encode each crop with the frozen CLIP, store them by sample key."""
    from vla.stages.precompute_regions import PrecomputeRegionsRecipe, run

    cfg = _load_recipe(PrecomputeRegionsRecipe, "precompute-regions", recipe, set_, {"detector": detector, "clip": clip})
    art = run(cfg, data, out, force=force, command=_command())
    if art is None:  # a torchrun rank other than 0: rank 0 reports
        return
    m = art.manifest
    console.print(f"[green]✓[/] precompute-regions → {art.path}  ({m['timings']['wall_s']:.1f} s, "
                  f"{m['timings']['images_per_s']:.1f} images/s)")
    console.print(f"  images: {m['counts']['images']}  regions: {m['counts']['regions']}  "
                  f"no detection: {m['counts']['no_detection']}  boxes dropped: {m['counts']['boxes_dropped']}",
                  highlight=False)


@app.command("train-teacher")
@handles_errors
def train_teacher(
    regions: Optional[str] = typer.Option(None, "--regions", help="A precompute-regions artifact."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="The data the regions were built from (default: theirs)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Frozen CLIP (default: the one the regions were built with)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs; a teacher is saved after each."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """DCLIP: train the region-aware meta-teacher (cross-attention, InfoNCE) on frozen features."""
    from vla.stages.train_teacher import TrainTeacherRecipe, run

    cfg = _load_recipe(TrainTeacherRecipe, "train-teacher", recipe, set_,
                       {"regions": regions, "clip": clip, "epochs": epochs})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)
    if art is not None:
        console.print(f"  teachers saved for epochs {art.manifest['epochs']}; train loss {art.manifest['metrics']['train']}",
                      highlight=False)


@app.command("train-student")
@handles_errors
def train_student(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A train-teacher artifact."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    epoch: Optional[int] = typer.Option(None, "--epoch", help="Which of the teacher's epochs (default: its last)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Image-text data (default: the teacher's)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="The CLIP to tune; must be the teacher's (the default)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """DCLIP: distil the meta-teacher into the CLIP image tower (text tower frozen)."""
    from vla.stages.train_student import TrainStudentRecipe, run

    cfg = _load_recipe(TrainStudentRecipe, "train-student", recipe, set_,
                       {"teacher": teacher, "teacher_epoch": epoch, "clip": clip})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)


def _print_done(art) -> None:
    if art is None:  # a torchrun rank other than 0: rank 0 reports
        return
    m = art.manifest
    sps = m["timings"].get("samples_per_s")
    console.print(f"[green]✓[/] {m['kind']} → {art.path}  ({m['timings']['wall_s']:.1f} s"
                  + (f", {sps:.0f} samples/s" if sps else "") + ")")
    for set_name, metrics in (m.get("metrics", {}).get("eval") or {}).items():
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float) and
                 k in ("mean_recall", "image_retrieval_recall@1", "text_retrieval_recall@1", "acc1",
                       "mean_per_class_recall", "text_truncated_fraction")}
        console.print(f"  {set_name}: {shown}", highlight=False)


# ---------------------------------------------------------------------------------------------
@app.command()
@handles_errors
def inspect(
    path: Path = typer.Argument(..., help="An artifact directory."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every output and compare with the manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show an artifact's manifest and lineage; --verify re-checks its digests."""
    from vla.artifacts import lineage, open_artifact, verify as verify_artifact

    art = open_artifact(path)
    m = art.manifest
    if as_json:
        console.print_json(json.dumps(m))
    else:
        console.print(f"[bold]{path}[/]  kind=[cyan]{m['kind']}[/]  format v{m['format_version']}  "
                      f"vla {m['vla_version']}  commit {m.get('git_commit') or '-'}")
        console.print(f"created {m['created']}   digest {m['digest'][:16]}   "
                      f"{len(m['outputs'])} files   {m['timings'].get('wall_s', 0):.1f} s")
        console.print("command: " + " ".join(m.get("command", [])), highlight=False)
        for section in ("counts", "metrics"):
            for line in _summary_lines(m.get(section) or {}):
                console.print(f"{section}: {line}", highlight=False)
        tree = Tree(f"[cyan]{m['kind']}[/] {path}")
        nodes = {-1: tree}
        for depth, role, ref in lineage(m):
            nodes[depth] = nodes[depth - 1].add(
                f"{role}: [cyan]{ref.get('kind')}[/] {ref.get('path')}  {str(ref.get('digest', ''))[:12]}")
        # piped, rich would crop the tree at 80 columns: draw it as wide as its longest path
        (console if console.is_terminal else _StdoutConsole(width=10_000)).print(tree)
    if verify:
        problems = verify_artifact(art)
        if problems:
            for p in problems:
                err_console.print(f"[red]✗[/] {p}")
            raise VlaError(f"{path}: {len(problems)} output(s) do not match the manifest; rebuild with --force")
        console.print(f"[green]✓[/] all {len(m['outputs'])} outputs match their sha256")


def _summary_lines(d: dict, prefix: str = "") -> list[str]:
    """One line per group of a nested counts/metrics dict, floats rounded, for reading at a glance."""
    flat = {k: v for k, v in d.items() if not isinstance(v, dict)}
    lines = []
    if flat:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in flat.items())
        lines.append(f"{prefix.rstrip('.') or '-'}: {shown}" if prefix else shown)
    for k, v in d.items():
        if isinstance(v, dict):
            lines += _summary_lines(v, f"{prefix}{k}.")
    return lines


# ---------------------------------------------------------------------------------------------
@app.command()
@handles_errors
def models(
    dirs: Optional[List[Path]] = typer.Argument(None, help="Directories to search for model artifacts "
                                                           "(default: runs and exports, where they exist)."),
) -> None:
    """List the registry's model names, whether each is on disk, and the models found in DIRS."""
    from vla.models.available import alias_on_disk, model_artifacts
    from vla.models.registry import ALIASES

    rows = [(name, a.kind, a.target, alias_on_disk(name) or "not on disk", a.description)
            for name, a in ALIASES.items()]
    _print_columns(("name", "kind", "loads", "on disk", "what"), rows)
    console.print("\nAlso: any open_clip ARCH[:TAG] (open_clip.list_pretrained()), hf-hub:ORG/REPO, "
                  "local-dir:PATH, ARCH@FILE, or a transformers hub id / directory as an embedder.",
                  highlight=False)
    found = model_artifacts(dirs if dirs else [d for d in (Path("runs"), Path("exports")) if d.is_dir()])
    if found:
        console.print()
        _print_columns(("artifact", "kind", "created"), found)


def _print_columns(header: tuple, rows: list) -> None:
    """A plain text table: columns padded to their widest cell, never wrapped."""
    table = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        console.print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1], highlight=False,
                      markup=False)


# ---------------------------------------------------------------------------------------------
@recipe_app.command("show")
@handles_errors
def recipe_show(
    file: Path = typer.Argument(..., help="A recipe YAML file."),
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Validate a recipe and print it fully resolved (defaults filled in)."""
    import yaml

    from vla.recipes import load_recipe, read_yaml, to_dict
    from vla.stages import recipe_class

    kind = read_yaml(file).get("kind")
    if not kind:
        raise UserError(f"recipe {file} has no 'kind:' naming its stage (e.g. kind: pretrain)")
    cfg = load_recipe(recipe_class(kind), file, set_ or [], kind=kind)
    console.print(yaml.safe_dump({"kind": kind, **to_dict(cfg)}, sort_keys=False).rstrip(), highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
