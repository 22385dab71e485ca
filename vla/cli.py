"""The `vla` command line: each command parses its options, resolves its recipe and calls one stage.

Heavy imports (torch, open_clip, transformers) happen inside the commands, so `vla --help` is fast.
Errors: a `UserError` prints one red line and exits 2, a `StageError` exits 1, anything else is
a bug and shows its traceback only with `--debug` (or VLA_DEBUG=1).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.tree import Tree

from vla import __version__
from vla.errors import UserError, VlaError

app = typer.Typer(
    name="vla",
    help="Vision-language alignment curricula (ProCLIP, DCLIP, MM-GEM) as staged, reproducible commands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
recipe_app = typer.Typer(help="Show and check recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

console = Console()
err_console = Console(stderr=True)

RecipeOpt = typer.Option(None, "--recipe", "-r", help="YAML recipe file (see recipes/).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe value: --set train.lr=1e-3 (repeatable).")
ForceOpt = typer.Option(False, "--force", help="Rebuild even if --out is a finished artifact.")


def _debug() -> bool:
    return os.environ.get("VLA_DEBUG", "") not in ("", "0")


def handles_errors(fn: Callable) -> Callable:
    """Turn vla's errors into one red line and the right exit code (2 user, 1 run time)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VlaError as e:
            if _debug():
                raise
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: rerun the same command to resume from the last checkpoint")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a bug: say so in one line; --debug shows where
            if _debug():
                raise
            err_console.print(f"[bold red]internal error:[/] {type(e).__name__}: {e} "
                              f"(rerun with --debug for the traceback and report it)",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


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
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact or a directory of WebDataset shards."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="CLIP to start from (registry name, name:pretrained, or a pretrain artifact)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """Train or fine-tune a CLIP with InfoNCE on image-text pairs."""
    from vla.stages.pretrain import PretrainRecipe, run

    cfg = _load_recipe(PretrainRecipe, "pretrain", recipe, set_, {"model": model})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)


@app.command("eval")
@handles_errors
def eval_(
    models: List[str] = typer.Argument(..., help="Models to compare: registry names, artifacts or exports."),
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact or a directory of eval sets."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    sets: Optional[str] = typer.Option(None, help="Comma-separated eval sets (default: the recipe's)."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """Score models on retrieval, long-text retrieval and zero-shot sets; compare them in one table."""
    from vla.stages.evaluate import EvalRecipe, run

    cfg = _load_recipe(EvalRecipe, "eval", recipe, set_, {"sets": f"[{sets}]" if sets else None})
    art = run(cfg, models, data, out, force=force, command=_command())
    console.print((art.path / "results.md").read_text(), highlight=False)
    console.print(f"[green]✓[/] eval → {out}")


@app.command()
@handles_errors
def distill(
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact, WebDataset shards or a JSONL of captions."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="CLIP whose text encoder is distilled (clip-vit-l, a pretrain artifact, ...)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="LLM embedder (qwen, minilm, a hub id or path)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="Embedder pooling: mean | last | cls | token:<tok>."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """ProCLIP stage 1: distil a CLIP text encoder into an LLM embedder + MLP adapter."""
    from vla.stages.distill import DistillRecipe, run

    cfg = _load_recipe(DistillRecipe, "distill", recipe, set_,
                       {"teacher": teacher, "embedder.name": embedder, "embedder.pooling": pooling})
    art = run(cfg, data, out, force=force, command=_command())
    _print_done(art)
    console.print(f"  teacher truncated: {art.manifest['counts']['teacher_truncated']}   "
                  f"held-out agreement: {art.manifest['metrics']['val']}", highlight=False)


@app.command("contrast-tune")
@handles_errors
def contrast_tune(
    data: Path = typer.Option(..., "--data", "-d", help="A synth artifact or WebDataset shards of image-text pairs."),
    out: Path = typer.Option(..., "--out", "-o", help="Artifact directory to write."),
    init: Optional[str] = typer.Option(None, "--init", help="A distill artifact, or 'random' for the LLM2CLIP baseline."),
    clip: Optional[str] = typer.Option(None, "--clip", help="CLIP whose image tower is tuned (default: the distill's teacher)."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="LLM embedder, with --init random."),
    recipe: Optional[Path] = RecipeOpt,
    set_: Optional[List[str]] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """ProCLIP stage 2: contrastive tuning with self-distillation (--init random: LLM2CLIP)."""
    from vla.stages.contrast_tune import ContrastTuneRecipe, run

    cfg = _load_recipe(ContrastTuneRecipe, "contrast-tune", recipe, set_,
                       {"init": init, "clip": clip, "embedder.name": embedder})
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
    src: Path = typer.Argument(..., help="A contrast-tune (or pretrain) artifact."),
    out: Path = typer.Option(..., "--out", "-o", help="Export directory to write."),
    copy_embedder: bool = typer.Option(False, "--copy-embedder", help="Copy the embedder's weights into the export."),
    force: bool = ForceOpt,
) -> None:
    """Write a self-contained model directory (open_clip image tower, adapter, model card) for vla.load."""
    from vla.export import ExportRecipe, run

    art = run(ExportRecipe(copy_embedder=copy_embedder), src, out, force=force, command=_command())
    console.print(f"[green]✓[/] export → {art.path}  ({len(art.manifest['outputs'])} files); "
                  f"load it with vla.load({str(art.path)!r})")


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
        console.print(tree)
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
