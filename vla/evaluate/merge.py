"""Merge the results of several `vla eval` runs (or CLIP_benchmark result files) into one table.

Inputs, any mix of:
- an eval artifact (or any directory with vla's `results.json`): {model: {set: metrics}};
- a CLIP_benchmark result JSON (`dataset`, `model`, `pretrained`, `task`, `metrics`), as its CLI
  and `vla eval` (under `clip_benchmark/`) write them, or a directory of them.

Rows are models, by label; a model that two inputs both measured on the same set keeps both,
the later one named `label (input)`. The output directory gets what `vla eval` writes for one run
(results.json, results.md, comparison.png) plus `benchmark.csv`, the CSV that
`clip_benchmark build` writes: one row per model × set with the metrics as columns.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from vla.errors import UserError
from vla.evaluate.report import Results, _jsonable, write_report


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable JSON file ({err}); pass an eval artifact or "
                        f"a CLIP_benchmark result file") from None


def _clip_benchmark_entry(data: dict) -> tuple[str, str, dict]:
    """(model label, set name, metrics) of one CLIP_benchmark result."""
    dataset = str(data["dataset"])
    set_name = dataset.split("/", 1)[1] if dataset.startswith("wds/") else dataset
    set_name = str(data.get("entry") or set_name)  # vla's: e.g. region captioning on a regional set
    model = str(data["model"])
    pretrained = str(data.get("pretrained", ""))
    # vla's own files use the label as `model`; CLIP_benchmark's are ARCH + pretrained tag
    label = model if data.get("tie_mode") or not pretrained else f"{model} {pretrained}"
    return label, set_name, dict(data["metrics"])


def read_results(path: str | Path) -> list[tuple[str, str, dict]]:
    """(model, set, metrics) entries of one input (see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass eval artifacts or CLIP_benchmark JSON files")
    if path.is_dir() and (path / "results.json").exists():
        results = _read_json(path / "results.json")
        if not (isinstance(results, dict) and all(isinstance(v, dict) and all(isinstance(m, dict) for m in v.values())
                                                  for v in results.values())):
            raise UserError(f"{path / 'results.json'} is not vla's {{model: {{set: metrics}}}} object; pass an eval "
                            f"artifact that `vla eval` wrote")
        return [(model, s, dict(m)) for model, per_set in results.items() for s, m in per_set.items()]
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    entries = []
    for f in files:
        data = _read_json(f)
        if not isinstance(data, dict):
            raise UserError(f"{f} holds a JSON {type(data).__name__}, not a result object; eval-merge reads eval "
                            f"artifacts and CLIP_benchmark result files: move it out of {path} or pass those files")
        if {"dataset", "model", "metrics"} <= set(data):
            entries.append(_clip_benchmark_entry(data))
    if not entries:
        raise UserError(f"{path} holds no results (no results.json, no CLIP_benchmark result "
                        f"JSON); pass an eval artifact or a CLIP_benchmark output file")
    return entries


def merge_results(inputs: Sequence[str | Path]) -> Results:
    """{model: {set: metrics}} over all inputs, in input order."""
    merged: Results = {}
    for path in inputs:
        for model, set_name, metrics in read_results(path):
            if set_name in merged.get(model, {}):
                model = f"{model} ({path})"
            merged.setdefault(model, {})[set_name] = metrics
    return merged


def write_benchmark_csv(results: Results, path: str | Path) -> None:
    """`clip_benchmark build`'s CSV: one row per model × set, metric columns."""
    rows = [{"dataset": f"wds/{s}", "model": model, **_jsonable(m)}
            for model, per_set in results.items() for s, m in per_set.items()]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _check_out(inputs: Sequence[str | Path], out: Path) -> None:
    """Refuse an --out that is a file, or that is, lies inside or contains an input: the merged
    results.json and report would overwrite or mix with the results they are made from."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; --out names a directory for the merged table: "
                        f"choose another path")
    target = out.resolve()
    for path in inputs:
        p = Path(path).resolve()
        if target == p or target.is_relative_to(p) or p.is_relative_to(target):
            how = "is" if target == p else "lies inside" if target.is_relative_to(p) else "contains"
            raise UserError(f"--out {out} {how} the input {path}; eval-merge never writes over its inputs: "
                            f"choose an --out outside them")


def merge(inputs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Merge `inputs` and write the table, chart, results.json and benchmark.csv into `out`."""
    if not inputs:
        raise UserError("vla eval-merge needs at least one input (eval artifacts or "
                        "CLIP_benchmark result files)")
    _check_out(inputs, Path(out))
    results = merge_results(inputs)
    files = write_report(results, out)
    files["benchmark.csv"] = Path(out) / "benchmark.csv"
    write_benchmark_csv(results, files["benchmark.csv"])
    return files
