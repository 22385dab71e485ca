"""The evaluation report: results.json, a markdown table, a bar chart, and retrieval examples.

`results` is {model name: {eval set name: {metric: value}}} as `evaluate_model` returns per model.
Metric values are fractions in [0, 1] (CLIP_benchmark's convention) except counts (`n_*`,
`context_length`); the markdown and the chart show the fractions ×100, as papers do.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from vla.evaluate.evalsets import RETRIEVAL_TASKS, EvalSet
from vla.evaluate.run import Captioner, RegionEncoder, region_captioning_name, retrieval_examples
from vla.models.encoder import DualEncoder

Results = dict[str, dict[str, dict[str, float]]]

# key metrics of a set, chosen by which family its metrics belong to; (key, short label)
KEY_METRICS = (
    ("mean_recall", [("mean_recall", "mR"), ("image_retrieval_recall@1", "T→I R@1"),
                     ("text_retrieval_recall@1", "I→T R@1")]),
    ("acc1", [("acc1", "acc1"), ("mean_per_class_recall", "mPCR")]),
    ("cider_d", [("bleu4", "BLEU-4"), ("cider_d", "CIDEr-D")]),
    ("grounding_acc1", [("grounding_acc1", "acc@1")]),
    ("probe_region_acc", [("probe_region_acc", "region"), ("probe_global_acc", "global")]),
)
COUNT_KEYS = {"n_images", "n_texts", "n_classes", "context_length", "image_retrieval_ties",
              "text_retrieval_ties", "ties", "n_regions", "n_captioned", "n_fit"}
LEGEND = ("All numbers ×100. mR: mean of R@1/5/10 text→image and image→text; T→I R@1: a caption "
          "finds its image first; I→T R@1: an image finds one of its captions first; "
          "mPCR: mean per-class recall; CIDEr-D ×100 as in captioning papers; acc@1 (grounding): a "
          "caption picks its own box among its image's boxes; probe region / global: a linear "
          "probe's val accuracy on a small object's attribute from its region / the whole image.")
MODE_NOTES = {
    "clip_benchmark": "Ties ranked as CLIP_benchmark ranks them (`torch.topk` / `argmax` order).",
    "pessimistic": "Ties count against the model (a lower bound).",
    "expected": "Ties ranked in expectation over a random order among tied scores.",
}
TIE_NOTE = ("`image_retrieval_ties` / `text_retrieval_ties` / `ties`: how many text / image "
            "queries had a negative scoring exactly as their (best) positive; where they are "
            "not 0, the modes differ.")
# CLIP_benchmark's task of each vla task, for its JSON layout
CLIP_BENCHMARK_TASKS = {"retrieval": "zeroshot_retrieval", "long_retrieval": "zeroshot_retrieval",
                        "regional_retrieval": "zeroshot_retrieval",
                        "zeroshot_classification": "zeroshot_classification",
                        "captioning": "captioning", "grounding": "grounding",
                        "attribute_probe": "linear_probe"}


def key_columns(results: Results) -> list[tuple[str, str, str]]:
    """(set, metric key, label) of every key metric present, sets in first-seen order."""
    sets: dict[str, set[str]] = {}
    for per_set in results.values():
        for set_name, metrics in per_set.items():
            sets.setdefault(set_name, set()).update(metrics)
    columns = []
    for set_name, keys in sets.items():
        for marker, metrics in KEY_METRICS:
            if marker in keys:
                columns += [(set_name, key, label) for key, label in metrics if key in keys]
    return columns


def _fmt(key: str, value) -> str:
    if value is None:
        return "none" if key == "context_length" else "–"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if key in COUNT_KEYS:
        return str(int(value))
    return f"{100 * value:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def model_notes(results: Results, sets: Sequence[EvalSet], models: dict[str, DualEncoder]) -> list[str]:
    """What the table cannot say by itself: how each model read the regions, which models were
    left out of captioning (they do not generate), and how much of a set was captioned."""
    notes = []
    regional = [s.name for s in sets if s.task == "regional_retrieval"]
    captioning = [s.name for s in sets if s.task == "captioning"]
    if regional:
        full = [m for m, enc in models.items() if isinstance(enc, RegionEncoder)]
        crop = [m for m in models if m not in full]
        how = [f"{', '.join(full)}: each region from the full image and its box (RoIAlign)"] if full else []
        how += [f"{', '.join(crop)}: each region's crop"] if crop else []
        notes.append(f"Regional retrieval ({', '.join(regional)}) embeds {'; '.join(how)}.")
    if regional or captioning:
        writers = [m for m, enc in models.items() if isinstance(enc, Captioner)]
        others = [m for m in models if m not in writers]
        entries = captioning + [region_captioning_name(r) for r in regional if writers]
        if entries and others:
            notes.append(f"Captioning ({', '.join(entries)}): {', '.join(others)} "
                         f"{'does' if len(others) == 1 else 'do'} not generate text, so "
                         f"{'it has' if len(others) == 1 else 'they have'} no captioning results.")
    for set_name in dict.fromkeys(k for per_set in results.values() for k in per_set):
        m = next((per_set[set_name] for per_set in results.values() if "n_captioned" in per_set.get(set_name, {})),
                 None)
        total = m and (m.get("n_images") or m.get("n_regions"))
        if m and total and m["n_captioned"] < total:
            notes.append(f"{set_name}: {int(m['n_captioned'])} of {int(total)} "
                         f"{'regions' if 'n_regions' in m else 'images'} captioned, an evenly spread "
                         f"subset that is the same for every model (the recipe's caption cap).")
    return notes


def results_markdown(results: Results, mode: str = "clip_benchmark", notes: Sequence[str] = ()) -> str:
    """One summary row per model over the key metrics (best in bold), then every metric per set;
    the legend says how ties were ranked (`mode`); `notes` follow the table."""
    columns = key_columns(results)
    rows = []
    for model, per_set in results.items():
        row = [model]
        for set_name, key, _ in columns:
            value = per_set.get(set_name, {}).get(key)
            best = max((r.get(set_name, {}).get(key, -math.inf) for r in results.values()),
                       default=-math.inf)
            cell = _fmt(key, value)
            # bold the best only when there is something to compare
            row.append(f"**{cell}**" if len(results) > 1 and value is not None and value == best
                       else cell)
        rows.append(row)
    lines = ["# Evaluation results", "", f"{LEGEND} {MODE_NOTES[mode]}", ""]
    lines += _table(["model"] + [f"{s} {label}" for s, _, label in columns], rows)
    truncated = [f"- {model} on {set_name}: {100 * m['text_truncated_fraction']:.1f}% of texts "
                 f"are longer than its {m['context_length']}-token text context"
                 for model, per_set in results.items() for set_name, m in per_set.items()
                 if m.get("text_truncated_fraction")]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if truncated:
        lines += ["", "Where the text side truncated:", ""] + truncated
    set_names = list(dict.fromkeys(s for per_set in results.values() for s in per_set))
    if set_names:
        lines += ["", TIE_NOTE]
    for set_name in set_names:
        keys = list(dict.fromkeys(k for per_set in results.values()
                                  for k in per_set.get(set_name, {})))
        lines += ["", f"## {set_name}", ""]
        lines += _table(["model"] + keys,
                        [[model] + [_fmt(k, per_set[set_name].get(k)) for k in keys]
                         for model, per_set in results.items() if set_name in per_set])
    return "\n".join(lines) + "\n"


def _jsonable(value):
    """NaN → null: JSON has no NaN, and acc5 is NaN under five classes."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_comparison_chart(results: Results, path: str | Path) -> None:
    """One small panel per key metric, each on its own axis (so an R@1 of 4 is not squashed under
    a mean recall of 60), one bar per model, values ×100; the legend names the models."""
    columns = key_columns(results)
    models = list(results)
    colours = [f"C{i % 10}" for i in range(len(models))]
    n_cols = min(4, max(1, len(columns)))
    n_rows = max(1, math.ceil(len(columns) / n_cols))
    fig = Figure(figsize=(3.0 * n_cols + 0.5, 2.6 * n_rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, (set_name, key, label) in zip(axes, columns):
        # a model without a metric (NaN, or a set it was not run on) gets no bar, not a zero
        values = [100 * v if (v := results[m].get(set_name, {}).get(key)) is not None
                  else math.nan for m in models]
        bars = ax.bar(range(len(models)), values, 0.8, color=colours)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.1f}" for v in values],
                     fontsize=7, padding=1)
        finite = [v for v in values if not math.isnan(v)]
        ax.set_ylim(0, max(finite + [1.0]) * 1.18)
        ax.set_title(f"{set_name}: {label}", fontsize=9)
        ax.set_xticks([])
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(columns):]:
        ax.axis("off")
    handles = [Patch(color=c, label=m) for m, c in zip(models, colours)] if columns else []
    if handles:
        fig.legend(handles=handles, labels=models, fontsize=8, loc="outside lower center",
                   ncols=min(len(models), 4))
    fig.suptitle("Key metrics per eval set (×100; each panel has its own scale)", fontsize=10)
    fig.savefig(path, dpi=130)


def write_curve(rows: Sequence[dict], x: str, series: dict[str, str], path: str | Path, title: str) -> None:
    """One panel per series (each on its own axis, values ×100) against `x`: e.g. a metric after
    every training epoch. `rows` are dicts holding `x` and each series' key."""
    xs = [r[x] for r in rows]
    fig = Figure(figsize=(3.2 * len(series) + 0.5, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(series), squeeze=False).ravel()
    for i, (ax, (key, label)) in enumerate(zip(axes, series.items())):
        ys = [100 * r[key] if r.get(key) is not None else math.nan for r in rows]
        ax.plot(xs, ys, marker="o", color=f"C{i}")
        for xv, yv in zip(xs, ys):
            ax.annotate(f"{yv:.1f}", (xv, yv), fontsize=7, textcoords="offset points", xytext=(0, 4), ha="center")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.set_xticks(xs)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=130)


#: the loss terms a joint-train manifest logs (`mmgem.loss_curves`), in the order they are drawn
LOSS_TERMS = {"gen": "L_gen (captioning)", "emb": "L_emb (contrastive)"}


def loss_curve_figure(curves: dict[str, dict[str, list]]) -> Figure:
    """One panel per loss term (L_gen, then L_emb), one line per model that logged the term, against
    the training step: the curves of joint-train manifests (`mmgem.loss_curves`: ``step`` and each
    term's mean over a log window) side by side, e.g. joint's and caption-only's L_gen."""
    terms = [t for t in LOSS_TERMS if any(t in c for c in curves.values())]
    fig = Figure(figsize=(4.2 * max(1, len(terms)) + 0.5, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(terms)), squeeze=False).ravel()
    models = list(curves)
    for ax, term in zip(axes, terms):
        for i, name in enumerate(models):
            if term in curves[name]:
                ax.plot(curves[name]["step"], curves[name][term], color=f"C{i % 10}", label=name, linewidth=1.4)
        ax.set_title(LOSS_TERMS[term], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Training loss per log window (joint-train manifests)", fontsize=10)
    return fig


def training_markdown(records: dict[str, dict]) -> str:
    """The training side of claim (a), from each joint-train manifest's `mmgem` block: the loss
    weights, each term's last logged loss, and on the LM each objective's gradient norm (as it
    enters L) and their cosine at the first and last probe step."""
    rows = []
    for name, m in records.items():
        curves, probes = m.get("loss_curves") or {}, m.get("gradient_norms") or []
        weights = m.get("loss_weights") or {}

        def last(term):
            return f"{curves[term][-1]:.3f}" if curves.get(term) else "–"

        def lm(record, key):
            v = ((record or {}).get("groups", {}).get("lm") or {}).get(key)
            return "–" if v is None else f"{v:.3g}"

        first, end = (probes[0], probes[-1]) if probes else (None, None)
        rows.append([name, str(m.get("objective", "–")), f"{weights.get('gen', 1.0):g}", last("emb"), last("gen"),
                     f"{lm(first, 'emb_grad_norm')} / {lm(first, 'gen_grad_norm')} / {lm(first, 'cosine')}"
                     + (f" (step {first['step']})" if first else ""),
                     f"{lm(end, 'emb_grad_norm')} / {lm(end, 'gen_grad_norm')} / {lm(end, 'cosine')}"
                     + (f" (step {end['step']})" if end else "")])
    header = ["model", "objective", "w_gen", "L_emb, last log", "L_gen, last log",
              "LM ‖∇emb‖ / ‖∇gen‖ / cos, first probe", "same, last probe"]
    return ("## Training (joint-train manifests)\n\nFrom each stage-1 artifact's `mmgem` block: its last "
            "logged loss terms (`loss_curves`, means over a log window; an arm logs only its own term) "
            "and each objective's gradient on the LM as it enters L (`gradient_norms`, on the run's "
            "fixed probe batch). The curves: [loss_curves.png](loss_curves.png).\n\n"
            + "\n".join(_table(header, rows)) + "\n")


def write_retrieval_grid(images: Sequence[Image.Image], queries: Sequence[str],
                         targets: Sequence[int], scores: torch.Tensor | Sequence[torch.Tensor],
                         path: str | Path, k: int = 5, title: str = "",
                         row_labels: Sequence[str] | None = None,
                         galleries: Sequence[Sequence[Image.Image]] | None = None) -> None:
    """One row per text query: the query (under its `row_labels` entry, e.g. the model), then its
    top-k images with their scores; the correct image is framed green. When it is not in the
    top-k, the query says at which rank it is. `galleries[q]`, when given, is row q's own set of
    images (rows from different eval sets), and `scores[q]` its scores over them."""
    k = min(k, min(len(row) for row in scores))
    fig = Figure(figsize=(2.0 * (k + 1.6), 2.2 * len(queries) + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(queries), k + 1, width_ratios=[1.6] + [1] * k)
    for q, (query, target) in enumerate(zip(queries, targets)):
        # stable descending sort; the correct image's pessimistic rank: #others scoring ≥ it
        gallery = galleries[q] if galleries is not None else images
        order = torch.argsort(scores[q], descending=True, stable=True)[:k].tolist()
        rank = int((scores[q] >= scores[q][target]).sum()) - 1
        text_ax = fig.add_subplot(grid[q, 0])
        text_ax.axis("off")
        if row_labels:
            text_ax.text(0.0, 0.97, row_labels[q], va="top", ha="left", fontsize=9,
                         weight="bold", transform=text_ax.transAxes)
        note = "" if target in order else f"\n(correct image at rank {rank + 1})"
        # long captions in a smaller font, cut to what fits beside a row of images
        long = len(query) > 120
        shown = textwrap.fill(textwrap.shorten(query, 420 if long else 260, placeholder=" …"),
                              44 if long else 30)
        text_ax.text(0.0, 0.5, shown + note, va="center", ha="left", fontsize=6 if long else 9,
                     transform=text_ax.transAxes)
        for j, idx in enumerate(order):
            ax = fig.add_subplot(grid[q, j + 1])
            ax.imshow(gallery[idx], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            correct = idx == target
            for spine in ax.spines.values():
                spine.set_color("#1a9e1a" if correct else "#bbbbbb")
                spine.set_linewidth(5 if correct else 1)
            ax.set_title(f"#{j + 1}  {scores[q][idx]:.3f}", fontsize=8,
                         color="#1a9e1a" if correct else "black")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)


def write_model_examples(sets: Sequence[EvalSet], models: dict[str, DualEncoder], path: str | Path,
                         n_queries: int = 4) -> bool:
    """The same queries for every model, one row per query and model: from the short-caption
    retrieval set and, when there is one, as many from the long-caption set (where a
    16-token CLIP and an LLM embedder differ most). False when there is no retrieval set."""
    candidates = [s for s in sets if s.task in RETRIEVAL_TASKS]
    if not candidates or not models or n_queries <= 0:
        return False
    chosen = [s for task in ("retrieval", "long_retrieval")
              for s in candidates[:] if s.task == task][:2] or candidates[:1]
    per_set = max(1, n_queries // len(chosen)) if len(chosen) > 1 else n_queries
    images, queries, targets, scores, labels = [], [], [], [], []
    for es in chosen:
        examples = {name: retrieval_examples(model, es, per_set) for name, model in models.items()}
        for q in range(len(next(iter(examples.values())).queries)):
            for name, ex in examples.items():
                # every row carries its own gallery: sets differ in images
                images.append(es.images)
                queries.append(ex.queries[q])
                targets.append(ex.targets[q])
                scores.append(ex.scores[q])
                labels.append(f"{name} · {es.name}")
    write_retrieval_grid(images[0], queries, targets, scores, path, row_labels=labels,
                         galleries=images,
                         title="text → image, top 5 (the correct image framed green)")
    return True


def write_report(results: Results, out_dir: str | Path, sets: Sequence[EvalSet] = (),
                 models: dict[str, DualEncoder] | None = None,
                 examples: int = 4, mode: str = "clip_benchmark") -> dict[str, Path]:
    """Write results.json, results.md, comparison.png, and — given the eval sets and the models
    (by the names used in `results`) — retrieval_examples.png with `examples` queries."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.json": out / "results.json", "results.md": out / "results.md",
             "comparison.png": out / "comparison.png"}
    files["results.json"].write_text(json.dumps(_jsonable(results), indent=2) + "\n",
                                     encoding="utf-8")
    notes = model_notes(results, sets, models or {})
    files["results.md"].write_text(results_markdown(results, mode, notes), encoding="utf-8")
    write_comparison_chart(results, files["comparison.png"])
    if write_model_examples(sets, models or {}, out / "retrieval_examples.png", examples):
        files["retrieval_examples.png"] = out / "retrieval_examples.png"
    return files


def _slug(text: str) -> str:
    """A file-name-safe form: runs of anything but letters, digits, `.`, `+`, `-` → `_`."""
    return re.sub(r"[^\w.+-]+", "_", text).strip("_")


def write_clip_benchmark_results(results: Results, out_dir: str | Path,
                                 sets: Sequence[EvalSet] = (), refs: dict[str, str] | None = None,
                                 mode: str = "clip_benchmark") -> list[Path]:
    """One JSON per model × set in CLIP_benchmark's layout (`dataset`, `model`, `pretrained`,
    `task`, `metrics`, `language`), named as its CLI names them by default,
    `{dataset}_{pretrained}_{model}_{language}_{task}.json`, so that `clip_benchmark build` and
    other result-table tools read them. `dataset` is `wds/<set>` (how its CLI names the set);
    `model` is vla's model label and `pretrained` the reference it was loaded from (`refs`).
    `tie_mode` is vla's own addition, and so is `entry`, the results entry a file holds: region
    captioning on a regional set is that set's dataset with task `captioning`, beside its
    `zeroshot_retrieval` file, and `entry` (`<set>_captioning`) tells `vla eval-merge` them apart."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = {s.name: s.task for s in sets}
    datasets = {region_captioning_name(s.name): s.name for s in sets if s.task == "regional_retrieval"}
    tasks.update({entry: "captioning" for entry in datasets})
    written = []
    for model, per_set in results.items():
        pretrained = (refs or {}).get(model, model)
        for set_name, metrics in per_set.items():
            task = CLIP_BENCHMARK_TASKS.get(tasks.get(set_name, ""), "zeroshot_retrieval"
                                            if "mean_recall" in metrics else
                                            "zeroshot_classification" if "acc1" in metrics
                                            else "captioning")
            dataset = datasets.get(set_name, set_name)
            dump = {"dataset": f"wds/{dataset}", "model": model, "pretrained": pretrained,
                    "task": task, "metrics": _jsonable(metrics), "language": "en",
                    "tie_mode": mode, "entry": set_name}
            name = (f"{_slug(dataset)}_{_slug(Path(pretrained).name or pretrained)}_"
                    f"{_slug(model)}_en_{task}.json")
            path = out / name
            path.write_text(json.dumps(dump) + "\n", encoding="utf-8")
            written.append(path)
    return written
