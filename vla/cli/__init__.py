"""The `vla` command line: each command parses its options, resolves its recipe and calls one stage.

A stage command is its own options under `@stage_command` (which adds the shared ones: the
training flags on a command that trains, then --recipe, --set and --force) and one call,
`run_stage(kind, locals())`, which turns the options into recipe overrides (`recipe_overrides`)
and runs the stage. A new stage adds its recipe class to `vla.stages.RECIPES` and a command here.
The shared options, `stage_command` and `run_stage` are in vla/cli/shape.py; the commands that
read artifacts and recipes (inspect, models, recipe show, eval-merge) in vla/cli/tools.py.

Heavy imports (torch, open_clip, transformers) happen inside the commands, so `vla --help` is fast.
Errors: a `UserError` prints one red line and exits 2, a `StageError` exits 1, anything else is
a bug and shows its traceback only with `--debug` (or VLA_DEBUG=1); `--debug` never changes the
exit code. Output piped into a command that stops reading (`vla eval ... | head`) ends quietly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from vla.cli.shape import (DATA_FORMS, NOT_RECIPE, RECIPE_KEYS, TRAIN_FLAGS, TRAIN_PARAMS, DataOpt, Device,  # noqa: F401
                           ForceOpt, OutOpt, Precision, SetOpt, app, console, data_option, err_console,
                           handles_errors, recipe_app, recipe_overrides, run_stage, stage_command)
from vla.errors import VlaError


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


@stage_command("eval-teacher")
def eval_teacher(
    models: List[str] = typer.Argument(..., metavar="TEACHER...", help="Teachers: a train-teacher artifact (PATH: its last epoch, "
                                                   "PATH:N: epoch N) or a train-student artifact (the teacher "
                                                   "and epoch it distilled)."),
    regions: List[str] = typer.Option(..., "--regions", help="A regions table of held-out images (`vla "
                                      "precompute-regions --set split=val`), one per detector the teachers "
                                      "used (repeatable)."),
    out: Path = OutOpt,
    images: Optional[int] = typer.Option(None, "--images", help="Score the first N images of the table (images)."),
    **shared: Any,
) -> None:
    """DCLIP: score meta-teachers as retrieval models on held-out images, beside the base CLIP."""
    # the teachers and tables are the stage's inputs, not recipe values (they pass as `models`, `data`)
    art = run_stage("eval-teacher", {**locals(), "data": regions, "regions": None}, inputs=("models", "data"))
    console.print((art.path / "results.md").read_text().split("\n## ")[0], highlight=False)
    console.print(f"[green]✓[/] eval-teacher → {out}")


from vla.cli import tools  # noqa: E402,F401  (registers inspect, models, recipe show, eval-merge)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
