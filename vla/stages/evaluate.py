"""`vla eval`: score one or more models on the evaluation sets and compare them in one table.

Story: each model (a registry name, a training artifact or an export) → the eval sets (from a
synth artifact's `eval/` or any directory in CLIP_benchmark's WebDataset layout) → retrieval,
long-text retrieval, zero-shot, regional retrieval and captioning metrics → an eval artifact with
results.json, a markdown table, figures, one CLIP_benchmark-layout JSON per model × set under
`clip_benchmark/`, and the captions each generating model wrote under `captions/`.

`mode` says how tied scores rank (`vla.evaluate.retrieval`): `clip_benchmark` (the default)
computes what CLIP_benchmark computes, `topk`/`argmax` ties included, so equal embeddings give
equal numbers; `pessimistic` counts every tie against the model; `expected` averages over a random
order among ties. Without ties the three agree; every set reports its tie counts.

MM-GEM models (joint-train, stage2-roi artifacts) are scored on everything they can do: regions
from the full image + box (RoIAlign, h4), image and region captions decoded as `caption:` says
(`CaptionConfig`); a dual encoder in the same table gets region crops and no captioning rows.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import UserError
from vla.evaluate.run import CaptionConfig

KIND = "eval"


@dataclass
class EvalRecipe:
    sets: list[str] = field(default_factory=lambda: ["retrieval", "long_retrieval", "zeroshot"])
    batch_size: int = 256
    examples: int = 4            # text queries shown in the retrieval-examples figure
    device: str = "auto"         # "auto" (the GPU when there is one) | "cpu" | "cuda"
    mode: Literal["clip_benchmark", "pessimistic", "expected"] = "clip_benchmark"  # tie ranking
    caption: CaptionConfig = field(default_factory=CaptionConfig)  # decoding, for models that generate
    split: Literal["test", "val"] = "test"  # a synth artifact's split the sets come from: test (its eval/)
                                            # or val (the same sets built from the val split, for choices)


def resolve_eval_dir(data: Path, split: str = "test", scratch: Path | None = None) -> tuple[Path, dict]:
    """A synth artifact (its `eval/`, or with `split: val` the same sets written from its val
    split into `scratch`), or a directory holding eval sets (test only)."""
    if (data / "manifest.json").exists():
        art = open_artifact(data, "synth", role="--data")
        if split == "test":
            return data / "eval", {"data": art}
        from vla.data.synth import split_eval_sets

        assert scratch is not None
        split_eval_sets(data, split, scratch)
        return scratch, {"data": art}
    if not data.is_dir():
        raise UserError(f"--data {data} does not exist; pass a synth artifact or a directory of eval sets")
    if split != "test":
        raise UserError(f"split: {split} needs a synth artifact as --data (a directory of eval sets has one split)")
    return data, {"data": {"path": str(data), "kind": "eval-sets"}}


# what each training artifact is, for table rows and legends
_METHODS = {"pretrain": "CLIP", "distill": "ProCLIP stage 1", "export": "export",
            "stage2-roi": "MM-GEM stage 2",
            "train-student": "DCLIP"}
# MM-GEM stage 1 by the objective it trained (the paper's same-budget ablation)
_JOINT_TRAIN = {"joint": "MM-GEM stage 1", "embed": "MM-GEM embed-only", "caption": "MM-GEM caption-only"}


def model_label(ref: str, name: str) -> str:
    """A readable row label: the method the artifact's manifest records, then its directory
    (`ProCLIP (contrast)`, `LLM2CLIP (llm2clip)`, `CLIP (clip)`); a plain model directory is its
    folder name; a registry name stays as it is."""
    path = Path(ref)
    manifest = path / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text(encoding="utf-8"))
        kind, recipe = m.get("kind", ""), m.get("recipe") or {}
        if kind == "contrast-tune":
            method = "LLM2CLIP" if recipe.get("init") == "random" else "ProCLIP"
        elif kind == "joint-train":
            method = _JOINT_TRAIN.get(recipe.get("objective", "joint"), kind)
        else:
            method = _METHODS.get(kind, kind)
        return f"{method} ({path.name})" if method else path.name
    return path.name if path.is_dir() else name


def training_records(refs: dict[str, str]) -> dict[str, dict]:
    """{row name: the `mmgem` block of its manifest} for the models that are joint-train artifacts
    with loss curves (the training side of MM-GEM's claim (a))."""
    out = {}
    for name, ref in refs.items():
        manifest = Path(ref) / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text(encoding="utf-8"))
            if m.get("kind") == "joint-train" and (m.get("mmgem") or {}).get("loss_curves", {}).get("step"):
                out[name] = m["mmgem"]
    return out


def write_training(records: dict[str, dict], out: Path) -> None:
    """`loss_curves.png` (each term's curve, one line per joint-train model) and a training section
    appended to results.md; nothing when no model is a joint-train artifact with loss curves."""
    from vla.evaluate.report import loss_curve_figure, training_markdown

    if not records:
        return
    loss_curve_figure({n: r["loss_curves"] for n, r in records.items()}).savefig(out / "loss_curves.png", dpi=130)
    with open(out / "results.md", "a", encoding="utf-8") as f:
        f.write("\n" + training_markdown(records))


def write_captions(written: dict[str, dict[str, list[dict]]], out: Path) -> None:
    """`captions/<model>/<entry>.jsonl`: every caption a model wrote, with its references, to read
    beside the BLEU-4 / CIDEr-D it scored (models that generate only)."""
    from vla.evaluate.report import _slug

    for model, entries in written.items():
        for entry, rows in entries.items():
            folder = out / _slug(model)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{entry}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def run(cfg: EvalRecipe, models: Sequence[str], data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.distributed import resolve_device
    from vla.evaluate.report import write_clip_benchmark_results, write_report
    from vla.evaluate.run import evaluate_model
    from vla.models.load import load_encoder
    from vla.stages.common import eval_sets

    if not models:
        raise UserError("vla eval needs at least one model (a registry name, an artifact or an export)")
    claim_out(out, force=force, inputs={"data": data, **{f"model{i}": ref for i, ref in enumerate(models)}})
    device = resolve_device(cfg.device)
    scratch = tempfile.TemporaryDirectory(prefix="vla-evalsets-")  # split: val's sets, for this run only
    eval_dir, inputs = resolve_eval_dir(Path(data), cfg.split, Path(scratch.name))
    sets = eval_sets(eval_dir, cfg.sets)  # fail on a missing set before loading any model
    for i, ref in enumerate(models):
        if (Path(ref) / "manifest.json").exists():
            inputs[f"model{i}"] = open_artifact(ref)
    encoders = [load_encoder(ref, device=device) for ref in models]
    names = [model_label(ref, e.name) for ref, e in zip(models, encoders)]
    if len(set(names)) != len(names):  # two artifacts with the same directory name
        names = [f"{n} ({ref})" for n, ref in zip(names, models)]
    with ArtifactBuilder(out, KIND, recipe=cfg, inputs=inputs, force=force, command=command) as art:
        results, seconds, written = {}, {}, {}
        for name, enc in zip(names, encoders):
            start = time.perf_counter()
            written[name] = {}
            results[name] = evaluate_model(enc, sets, batch_size=cfg.batch_size, mode=cfg.mode,
                                           caption=cfg.caption, written=written[name])
            seconds[name] = round(time.perf_counter() - start, 2)
        write_captions(written, art.dir / "captions")
        write_report(results, art.dir, sets=sets, models=dict(zip(names, encoders)),
                     examples=cfg.examples, mode=cfg.mode)
        write_training(training_records(dict(zip(names, models))), art.dir)
        write_clip_benchmark_results(results, art.dir / "clip_benchmark", sets=sets,
                                     refs=dict(zip(names, models)), mode=cfg.mode)
        art.metrics.update(results)
        art.extra["device"] = str(device)
        art.extra["split"] = cfg.split
        if any(s.task in ("captioning", "regional_retrieval") for s in sets):
            from vla.evaluate.captioning import resolve_tokenizer

            # "java": pycocoevalcap's own PTBTokenizer; "python": vla's re-implementation
            art.extra["captioning_tokenizer"] = resolve_tokenizer(cfg.caption.tokenizer)
        art.timings["seconds_per_model"] = seconds
        art.counts.update({s.name: {"images": len(s.images)} for s in sets})
    scratch.cleanup()
    return art.artifact
