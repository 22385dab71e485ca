"""The `vla` command line: each command parses its options, resolves its recipe and calls one stage.

A stage command is its own options under `@stage_command` (which adds the shared ones: the
training flags on a command that trains, then --recipe, --set and --force) and one call,
`run_stage(kind, locals())`, which turns the options into recipe overrides (`recipe_overrides`)
and runs the stage. A new stage adds its recipe class to `vla.stages.RECIPES` and a command here.

Heavy imports (torch, open_clip, transformers) happen inside the commands, so `vla --help` is fast.
Errors: a `UserError` prints one red line and exits 2, a `StageError` exits 1, anything else is
a bug and shows its traceback only with `--debug` (or VLA_DEBUG=1); `--debug` never changes the
exit code. Output piped into a command that stops reading (`vla eval ... | head`) ends quietly.
"""

from __future__ import annotations

import functools
import inspect
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
    help="Vision-language alignment curricula as staged, reproducible commands: ProCLIP (with the "
         "LLM2CLIP baseline), DCLIP and MM-GEM.",
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

# --- the shared options ----------------------------------------------------------------------
RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe file (see recipes/).")
SetOpt = typer.Option(None, "--set", "-s", metavar="KEY=VALUE",
                      help="Override a recipe value: --set train.lr=1e-3 (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Rebuild even if --out is a finished artifact.")
OutOpt = typer.Option(..., "--out", "-o", help="Artifact directory to write.")
DATA_FORMS = ("a directory, a .tar, '/shards/{00000..00999}.tar', a glob, pipe:CMD or a URL, "
              "as webdataset names them")
DataOpt = typer.Option(..., "--data", "-d", metavar="DATA",
                       help=f"A synth artifact, a .jsonl manifest, or WebDataset shards: {DATA_FORMS}.")


def data_option(what: str, required: bool = False) -> Any:
    """`--data` as a plain string (URLs and `pipe:` reach the reader unchanged), described per command."""
    return typer.Option(... if required else None, "--data", "-d", metavar="DATA", help=what)


# The training loop's most used settings, on every command that trains with it; each is the
# recipe key train.<name> (vla/train.py's TrainConfig).
class Precision(str, Enum):
    """The training loop's precisions (vla.train.PRECISIONS), as a choice the CLI can list."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    """Where the training loop runs (TrainConfig.device)."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


StepsOpt = typer.Option(None, "--steps", help="Optimizer steps (train.steps).")
BatchOpt = typer.Option(None, "--batch-size", help="Batch per process (train.batch_size).")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate (train.lr).")
PrecisionOpt = typer.Option(None, "--precision", help="Training precision (train.precision).")
DeviceOpt = typer.Option(None, "--device", help="auto (a GPU when there is one), cpu or cuda (train.device).")

#: the options above, by parameter name: on every training command (tests/test_cli.py holds it)
TRAIN_FLAGS = ("steps", "batch_size", "lr", "precision", "device")
#: parameters that are no recipe value: what `run_stage` passes to the stage itself
NOT_RECIPE = ("models", "data", "src", "out", "recipe", "set_", "force")
#: parameters named otherwise in the recipe (everything else is the top-level key of its own name)
RECIPE_KEYS = {"embedder": "embedder.name", "pooling": "embedder.pooling", "epoch": "teacher_epoch"}


def _shared(name: str, annotation: Any, option: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


#: the training flags, in TRAIN_FLAGS' order, and the options every stage command ends with
TRAIN_PARAMS = [_shared("steps", Optional[int], StepsOpt), _shared("batch_size", Optional[int], BatchOpt),
                _shared("lr", Optional[float], LrOpt), _shared("precision", Optional[Precision], PrecisionOpt),
                _shared("device", Optional[Device], DeviceOpt)]
RECIPE_PARAMS = [_shared("recipe", Optional[Path], RecipeOpt), _shared("set_", Optional[List[str]], SetOpt),
                 _shared("force", bool, ForceOpt)]


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


def _recipe_value(shared: dict, key: str) -> Optional[str]:
    """A top-level or dotted recipe value as the `--recipe` file and `--set` of a command's shared
    options give it (unvalidated), for the early model check; the stage validates the recipe fully."""
    recipe, set_ = shared.get("recipe"), shared.get("set_")
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


def recipe_overrides(recipe_cls: Any, options: dict) -> dict:
    """A command's options as recipe overrides `{key: value}`: the training flags under `train.`
    (when the recipe has a training loop), the names in RECIPE_KEYS renamed, every other option
    under its own name; enums by their value. Options not given (None or empty) are left to the
    recipe, and NOT_RECIPE ones go to the stage itself."""
    import dataclasses

    has_loop = "train" in {f.name for f in dataclasses.fields(recipe_cls)}
    keys = {}
    for name, value in options.items():
        if name in NOT_RECIPE or value is None or value == "":
            continue
        key = f"train.{name}" if has_loop and name in TRAIN_FLAGS else RECIPE_KEYS.get(name, name)
        keys[key] = value.value if isinstance(value, Enum) else value
    return keys


def stage_command(name: Optional[str] = None, *, training: bool | tuple[str, ...] = False) -> Callable:
    """Register a stage command: the function's own parameters, then the training flags
    (`training=True`: all of TRAIN_FLAGS; a tuple: those named), then --recipe, --set and --force.
    A shared option the function declares itself keeps its own help. The function receives the
    shared options as keyword arguments (`**shared`) and hands `locals()` to `run_stage`."""
    flags = TRAIN_FLAGS if training is True else (training or ())

    def register(fn: Callable) -> Callable:
        own = inspect.signature(fn, eval_str=True).parameters
        params = [p for p in own.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params += [p for p in [*TRAIN_PARAMS, *RECIPE_PARAMS]
                   if p.name not in own and (p.name in flags or p in RECIPE_PARAMS)]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(params)  # what Typer reads
        return app.command(name)(handles_errors(command))
    return register


def run_stage(kind: str, options: dict, inputs: tuple[str, ...] = ("data",)) -> Any:
    """The one call behind every stage command: `kind`'s typed recipe — the `--recipe` file, then
    `--set`, then the command's own options (`recipe_overrides`) — and its stage's
    `run(cfg, *inputs, out, force=..., command=...)`. `options` is the command's `locals()` (its
    own parameters and the `shared` ones); `inputs` names those the stage takes before `--out`,
    passed as given (`--data` stays the string the user typed)."""
    from vla.recipes import load_recipe
    from vla.stages import recipe_class, stage_run

    options = {**{k: v for k, v in options.items() if k != "shared"}, **options.get("shared", {})}
    cls = recipe_class(kind)
    given = [f"{key}={value}" for key, value in recipe_overrides(cls, options).items()]
    cfg = load_recipe(cls, options.get("recipe"), list(options.get("set_") or []) + given, kind=kind)
    return stage_run(kind)(cfg, *(options[name] for name in inputs), options["out"],
                           force=options.get("force", False), command=_command())


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


# --- the embedded world, a CLIP, evaluation, export ------------------------------------------
@stage_command()
def synth(
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write (e.g. data/toy)."),
    seed: Optional[int] = typer.Option(None, help="World seed (overrides the recipe)."),
    **shared: Any,
) -> None:
    """Generate the embedded synthetic world: shards, evaluation sets and a YOLO copy.

    Recipe knobs (recipes/embedded/synth.yaml explains each; docs/world.md), beside the
    sizes n_train, n_val, n_test: image_size (stored px; 256 = 4x the CLIP's 64,
    so a small object's crop keeps >= 24 px), pattern_period and pattern_contrast
    (fill patterns that the 64 px view loses and a crop keeps), probe_train (the
    probe's train images). The manifest records every knob."""
    m = run_stage("synth", locals(), inputs=()).manifest
    console.print(f"[green]✓[/] synth → {out}  ({m['timings']['wall_s']:.1f} s)")
    for section in ("counts", "metrics"):
        for key, value in m.get(section, {}).items():
            console.print(f"  {key}: {value}")


@stage_command(training=True)
def pretrain(
    data: str = DataOpt,
    out: Path = OutOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="CLIP to start from (registry name, name:pretrained, or a pretrain artifact)."),
    **shared: Any,
) -> None:
    """Train or fine-tune a CLIP with InfoNCE on image-text pairs."""
    _check_models([("--model", model or _recipe_value(shared, "model"), "clip")])
    _print_done(run_stage("pretrain", locals()))


@stage_command("eval")
def eval_(
    models: List[str] = typer.Argument(..., help="Models to compare: registry names, artifacts or exports."),
    data: str = data_option("A synth artifact or a directory of eval sets (CLIP_benchmark's layout).", required=True),
    out: Path = OutOpt,
    sets: Optional[str] = typer.Option(None, help="Comma-separated eval sets (default: the recipe's)."),
    mode: Optional[str] = typer.Option(
        None, help="How tied scores rank: clip_benchmark (default: CLIP_benchmark's own topk), "
                   "pessimistic (ties count against the model) or expected (random tie order)."),
    **shared: Any,
) -> None:
    """Score models on retrieval, long-text, zero-shot, regional and captioning sets; compare them in one table."""
    _check_models([("model", ref, "clip") for ref in models if not (Path(ref) / "manifest.json").exists()])
    art = run_stage("eval", {**locals(), "sets": f"[{sets}]" if sets else None}, inputs=("models", "data"))
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


@stage_command()
def export(
    src: Path = typer.Argument(..., help="A contrast-tune, pretrain, train-student, joint-train or stage2-roi artifact."),
    out: Path = typer.Option(..., "--out", "-o", help="Export directory to write."),
    copy_embedder: bool = typer.Option(False, "--copy-embedder", help="Copy the embedder's weights into the export."),
    **shared: Any,
) -> None:
    """Write a model directory for vla.load (weights, tokenizer or embedder name, model card); the embedder is copied only with --copy-embedder."""
    art = run_stage("export", {**locals(), "copy_embedder": copy_embedder or None}, inputs=("src",))
    console.print(f"[green]✓[/] export → {art.path}  ({len(art.manifest['outputs'])} files); "
                  f"load it with vla.load({str(art.path)!r})")


# --- ProCLIP: distill → contrast-tune (--init random: the LLM2CLIP baseline) -----------------
@stage_command(training=True)
def distill(
    data: str = DataOpt,
    out: Path = OutOpt,
    teacher: Optional[str] = typer.Option(None, "--teacher", help="CLIP whose text encoder is distilled (clip-vit-l, a pretrain artifact, ...)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="LLM embedder (qwen, minilm, a hub id or path)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Embedder pooling: mean | last | cls | token:<tok>."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch of captions, split over the processes (train.batch_size)."),
    **shared: Any,
) -> None:
    """ProCLIP stage 1: distil a CLIP text encoder into an LLM embedder + MLP adapter."""
    _check_models([("--teacher", teacher or _recipe_value(shared, "teacher") or "clip-vit-l", "clip"),
                   ("--embedder", embedder or _recipe_value(shared, "embedder.name") or "qwen", "embedder")])
    art = run_stage("distill", locals())
    _print_done(art)
    if art is not None:  # None on torchrun ranks other than 0: rank 0 reports
        counts = art.manifest["counts"]
        console.print(f"  teacher truncated: {counts['teacher_truncated']}   embedder truncated: "
                      f"{counts['embedder_truncated']}   held-out agreement: {art.manifest['metrics']['val']}",
                      highlight=False)


@stage_command("contrast-tune", training=True)
def contrast_tune(
    data: str = DataOpt,
    out: Path = OutOpt,
    init: Optional[str] = typer.Option(None, "--init", help="A distill artifact, or 'random' for the LLM2CLIP baseline."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP whose image tower is tuned (default: the distill's teacher)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="LLM embedder, with --init random."),
    **shared: Any,
) -> None:
    """ProCLIP stage 2: contrastive tuning with self-distillation (--init random: LLM2CLIP)."""
    _check_contrast_tune_models(init or _recipe_value(shared, "init"), clip or _recipe_value(shared, "clip"),
                                embedder or _recipe_value(shared, "embedder.name"))
    _print_done(run_stage("contrast-tune", locals()))


def _check_contrast_tune_models(init: Optional[str], clip: Optional[str], embedder: Optional[str]) -> None:
    """The CLIP, a distill artifact as --init, and with --init random the embedder (qwen by default)."""
    _check_models([("--clip", clip, "clip"),
                   ("--init", init if init not in (None, "random", "distill") else None, None),
                   ("--embedder", (embedder or "qwen") if init == "random" else None, "embedder")])


# --- MM-GEM: joint-train → stage2-roi ---------------------------------------------------------
@stage_command("pretrain-lm", training=True)
def pretrain_lm(
    data: str = data_option("A synth artifact or WebDataset shards whose captions the LM learns "
                            f"({DATA_FORMS}).", required=True),
    out: Path = OutOpt,
    **shared: Any,
) -> None:
    """MM-GEM's embedded LM: a tiny Llama + BPE trained as a causal LM on the captions (held-out perplexity)."""
    art = run_stage("pretrain-lm", locals())
    _print_done(art)
    if art is not None:
        console.print(f"  held-out perplexity {art.manifest['metrics']['val_perplexity']:.2f} "
                      f"(untrained: {art.manifest['metrics']['val_perplexity_at_init']:.2f})", highlight=False)


@stage_command("joint-train", training=True)
def joint_train(
    data: str = DataOpt,
    out: Path = OutOpt,
    vision: Optional[str] = typer.Option(None, "--vision", help="Image tower: a pretrain artifact, a registry name (clip-vit-l) or open_clip name."),
    llm: Optional[str] = typer.Option(None, "--llm", help="Causal LM (tinyllama, a hub id or directory, a pretrain-lm artifact); default: the embedded tiny Llama."),
    objective: Optional[str] = typer.Option(None, "--objective", help="joint | embed | caption (the ablations)."),
    **shared: Any,
) -> None:
    """MM-GEM stage 1: one causal LM learns to embed ([EMB]) and caption ([CAP]), L = L_emb + L_gen."""
    _print_done(run_stage("joint-train", locals()))


@stage_command("stage2-roi", training=True)
def stage2_roi(
    data: str = data_option("A synth artifact or shards whose samples carry region boxes and captions "
                            f"({DATA_FORMS}).", required=True),
    out: Path = OutOpt,
    init: Optional[str] = typer.Option(None, "--init", help="The joint-train artifact to start from."),
    **shared: Any,
) -> None:
    """MM-GEM stage 2: RoIAlign regions; trains only h3 + soft prompts (captions) and h4 (retrieval)."""
    _print_done(run_stage("stage2-roi", locals()))


# --- DCLIP: detector → regions → meta-teacher → student ---------------------------------------
@stage_command("train-detector")
def train_detector(
    data: str = data_option("A synth artifact (its YOLO copy) or an ultralytics data .yaml.", required=True),
    out: Path = OutOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="ultralytics model config (yolov8n.yaml)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (epochs)."),
    batch: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch (batch)."),
    device: Optional[str] = typer.Option(None, "--device", help="ultralytics' device: cpu, 0, 0,1 (device; default: it chooses)."),
    **shared: Any,
) -> None:
    """DCLIP: train a YOLO for region proposals with ultralytics' own trainer (mAP in the manifest)."""
    art = run_stage("train-detector", locals())
    _print_done(art)
    console.print(f"  val: {art.manifest['metrics']['val']}", highlight=False)


@stage_command("precompute-regions")
def precompute_regions(
    data: str = DataOpt,
    out: Path = OutOpt,
    detector: Optional[str] = typer.Option(None, "--detector", help="'oracle', a train-detector artifact, or a YOLO .pt on disk."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Frozen CLIP whose image encoder embeds the crops (name or pretrain artifact)."),
    **shared: Any,
) -> None:
    """DCLIP: detect regions, encode each crop with the frozen CLIP, store them by sample key."""
    art = run_stage("precompute-regions", locals())
    if art is None:  # a torchrun rank other than 0: rank 0 reports
        return
    m = art.manifest
    console.print(f"[green]✓[/] precompute-regions → {art.path}  ({m['timings']['wall_s']:.1f} s, "
                  f"{m['timings']['images_per_s']:.1f} images/s)")
    console.print(f"  images: {m['counts']['images']}  regions: {m['counts']['regions']}  "
                  f"no detection: {m['counts']['no_detection']}  boxes dropped: {m['counts']['boxes_dropped']}",
                  highlight=False)


@stage_command("train-teacher", training=("batch_size", "lr", "precision", "device"))
def train_teacher(
    regions: Optional[str] = typer.Option(None, "--regions", help="A precompute-regions artifact."),
    out: Path = OutOpt,
    data: Optional[str] = data_option("The data the regions were built from (default: theirs)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Frozen CLIP (default: the one the regions were built with)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs; a teacher is saved after each (train.steps = epochs × images // batch)."),
    **shared: Any,
) -> None:
    """DCLIP: train the region-aware meta-teacher (cross-attention, InfoNCE) on frozen features."""
    art = run_stage("train-teacher", locals())
    _print_done(art)
    if art is not None:
        console.print(f"  teachers saved for epochs {art.manifest['epochs']}; train loss {art.manifest['metrics']['train']}",
                      highlight=False)


@stage_command("train-student", training=True)
def train_student(
    teacher: Optional[str] = typer.Option(None, "--teacher", help="A train-teacher artifact."),
    out: Path = OutOpt,
    epoch: Optional[int] = typer.Option(None, "--epoch", help="Which of the teacher's epochs (default: its last)."),
    data: Optional[str] = data_option("Image-text data (default: the teacher's)."),
    clip: Optional[str] = typer.Option(None, "--clip", help="The CLIP to tune; must be the teacher's (the default)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (train.steps; a recipe's `epochs` sets them instead)."),
    **shared: Any,
) -> None:
    """DCLIP: distil the meta-teacher into the CLIP image tower (text tower frozen)."""
    _print_done(run_stage("train-student", locals()))


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
