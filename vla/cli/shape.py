"""The one CLI shape every `vla` command has: the Typer app and its consoles, the shared options
(`--data` as the string typed, the training flags, --recipe/--set/--force), errors as one line and
an exit code (`handles_errors`), and `stage_command` + `run_stage`, which make a stage command its
own options and one call. vla/cli/__init__.py holds the stage commands, vla/cli/tools.py the
commands that read artifacts and recipes."""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

from vla import __version__
from vla.errors import Interrupted, VlaError

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

class StdoutConsole(Console):
    """stdout: a reader that stops reading (`vla eval ... | head`) got what it wanted, so that
    ends the command quietly with exit 0 (rich's default exits 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        _stdout_closed()
        raise typer.Exit(0)


# soft_wrap: lines are never cut at the console's width, so tables and dicts piped to a file or
# a log (where rich would assume 80 columns) stay one line each; a terminal wraps them itself.
console = StdoutConsole(soft_wrap=True)
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
    from vla.artifacts import start_stage_clock

    start_stage_clock()  # before the stage's imports and model loading: they are its time too
    from vla.recipes import load_recipe
    from vla.stages import recipe_class, stage_run

    options = {**{k: v for k, v in options.items() if k != "shared"}, **options.get("shared", {})}
    cls = recipe_class(kind)
    given = [f"{key}={value}" for key, value in recipe_overrides(cls, options).items()]
    cfg = load_recipe(cls, options.get("recipe"), list(options.get("set_") or []) + given, kind=kind)
    return stage_run(kind)(cfg, *(options[name] for name in inputs), options["out"],
                           force=options.get("force", False), command=_command())
