"""python -m vla.bench [--only a,b,c] [--quick] — run the benchmarks, print the table, write the JSON."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version

from rich.console import Console
from rich.table import Table

from vla.bench import BENCH_DIR, Figure, Part

PARTS = {"a": "trainer", "b": "cache", "c": "retrieval", "d": "cache_scale", "e": "dclip",
         "f": "mmgem_caption", "g": "joint_step", "h": "loader", "u": "loader_dtype"}


def _table(parts: list[Part]) -> Table:
    table = Table(title="vla bench", caption="\n".join(
        f"{p.name}: {p.title} — baseline: {p.baseline}" for p in parts), caption_justify="left")
    for col in ("", "measure", "vla", "baseline", "ratio", "goal", ""):
        table.add_column(col, justify="left" if col in ("", "measure") else "right")
    for part in parts:
        for f in part.figures:
            goal = f"{'≥' if f.higher_is_better else '≤'} {f.goal:.2f}"
            table.add_row(part.name, f"{f.what} ({f.unit})", f"{f.vla:,.2f}", f"{f.baseline:,.2f}",
                          f"{f.ratio:.2f}× [dim]{f.ratio_is}[/]", goal,
                          "[green]met[/]" if f.met else "[red]not met[/]")
    return table


def _conditions() -> dict:
    # no `import torch` here: the parts that need it import it, and part c alone runs without it
    from vla.artifacts import git_commit

    return {"cpus": os.cpu_count(), "torch": version("torch"), "python": platform.python_version(),
            "machine": platform.machine(), "device": "cpu", "git_commit": git_commit(),
            "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vla.bench", description=__doc__)
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma-separated parts: a (trainer), b (feature cache), c (retrieval eval), "
                             "d (feature cache at scale), e (DCLIP regions and teacher), f (MM-GEM captioning), "
                             "g (MM-GEM joint-train step), h (training loader, 256 px source with/without draft decode)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not figures")
    parser.add_argument("--table", action="store_true",
                        help=f"measure nothing: print the table of the last run ({BENCH_DIR / 'results.json'})")
    args = parser.parse_args()
    # a log file or pipe gets the table at full width, not wrapped at rich's default 80 columns
    console = Console(width=None if sys.stdout.isatty() else 130)
    if args.table:
        _print(console, _load(BENCH_DIR / "results.json"))
        return
    chosen = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    results = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "quick": args.quick, "conditions": _conditions(), "parts": {}}
    parts = []
    for name in chosen:
        module = importlib.import_module(f"vla.bench.{PARTS[name]}")
        console.print(f"[bold]part {name}[/] ({PARTS[name]}) …")
        start, load = time.perf_counter(), os.getloadavg()[0]
        part = module.run(args.quick)
        part.details.update(wall_s=time.perf_counter() - start, load_avg_1m=(load, os.getloadavg()[0]))
        parts.append(part)
        results["parts"][name] = {**dataclasses.asdict(part),
                                  "figures": [{**dataclasses.asdict(f), "met": f.met} for f in part.figures]}
        # written after every part, so an interrupted run keeps what it measured
        (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    _print(console, results)


def _load(path) -> dict:
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run `make bench` first")
    return json.loads(path.read_text())


def _print(console: Console, results: dict) -> None:
    """The table of a results dict (as written to results.json) and the conditions it ran under."""
    parts = [Part(**{**p, "figures": [Figure(**{k: v for k, v in f.items() if k != "met"}) for f in p["figures"]]})
             for p in results["parts"].values()]
    console.print(_table(parts))
    console.print(f"[dim]started {results['started']}; load average (1 min) at start "
                  f"{results['conditions']['load_avg_1m']:.1f} on {results['conditions']['cpus']} CPUs; "
                  f"details in {BENCH_DIR / 'results.json'}[/]")


if __name__ == "__main__":
    main()
