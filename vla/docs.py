"""The results pages in docs/results/ and the README rows generated from them.

    python -m vla.docs eval NAME EVAL_DIR --make TARGET   # after `make TARGET`: docs/results/NAME.md
    python -m vla.docs epochs NAME STUDENT --make TARGET  # a train-student's per-epoch val table
    python -m vla.docs sweep NAME STUDENT... --make TARGET  # students' last val row side by side
    python -m vla.docs bench                              # after `make bench`: docs/results/bench.md
    python -m vla.docs readme                             # README.md's blocks from docs/results/
    python -m vla.docs readme --check                     # exit 1 when README.md differs from them

A results page holds, between `<!-- headline -->` and `<!-- /headline -->`, one stamp line and
the headline table; the README holds the same text between `<!-- results:NAME -->` and
`<!-- /results -->`. The stamp names the git commit the artifacts were built at, the machine that
wrote the page (CPU cores, torch version) and the device the stages ran on, and the wall time:
the sum of `timings.wall_s` over the evaluation and every artifact in its lineage (each stage's
own time, model loading and feature caching included; the export, which follows the evaluation,
is not in its lineage), and the span from the earliest of those stages' starts to the
evaluation's end. A page that no command has written yet says so, and so does the README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path("docs/results")
HEADLINE = re.compile(r"<!-- headline -->\n(.*?)<!-- /headline -->", re.S)
README_BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

#: the results pages the README shows, and the command that writes each
PAGES = {"proclip": "make proclip", "dclip": "make dclip", "dclip-ablations": "make dclip-ablations",
         "dclip-teachers": "make dclip-teachers", "dclip-seeds": "make dclip-seeds",
         "dclip-sweep": "make dclip-sweep", "dclip-epochs": "make dclip-epochs",
         "mmgem": "make mmgem", "bench": "make bench"}


def placeholder(name: str) -> str:
    """The headline of a page that its command has not written yet."""
    return (f"*Not yet generated: `{PAGES.get(name, 'its make target')}` writes this table to "
            f"`docs/results/{name}.md`, stamped with the commit, the machine and the wall time.*\n")


def page(title: str, headline: str, body: str = "") -> str:
    return f"# {title}\n\n<!-- headline -->\n{headline}<!-- /headline -->\n" + (f"\n{body}" if body else "")


def headline(text: str, where: str = "page") -> str:
    m = HEADLINE.search(text)
    if not m:
        raise SystemExit(f"{where} has no <!-- headline --> … <!-- /headline --> block; "
                         f"rewrite it with `python -m vla.docs`")
    return m.group(1)


# --- stamps -------------------------------------------------------------------------------------
def _torch_version() -> str:
    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def machine() -> str:
    """The machine writing the page: cores and torch, read without importing torch."""
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {_torch_version()}"


def _parse_time(s: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(s) if s else None
    except ValueError:
        return None


def lineage_manifests(eval_dir: Path) -> list[tuple[Path, dict]]:
    """The evaluation's manifest and those of every artifact in its lineage that is still on disk
    (each once, in lineage order)."""
    from vla.artifacts import MANIFEST, lineage

    top = json.loads((eval_dir / MANIFEST).read_text())
    found: dict[Path, dict] = {eval_dir.resolve(): top}
    for _, _, ref in lineage(top):
        p = Path(str(ref.get("path", "")))
        f = p / MANIFEST
        if ref.get("path") and f.is_file() and p.resolve() not in found:
            m = json.loads(f.read_text())
            if m.get("digest") == ref.get("digest"):  # the artifact that was read, not a rebuild
                found[p.resolve()] = m
    return [(p, m) for p, m in reversed(list(found.items()))]


def stamp(target: str, stages: list[tuple[Path, dict]]) -> tuple[str, list[str]]:
    """The stamp line and a table of the stages (path, kind, wall time, device, commit)."""
    commits = sorted({str(m.get("git_commit") or "unknown")[:12] for _, m in stages})
    devices = sorted({str(m["device"]) for _, m in stages if m.get("device")}) or ["not recorded"]
    wall = sum(float(m.get("timings", {}).get("wall_s") or 0) for _, m in stages)
    starts, ends = [], []
    for _, m in stages:
        end = _parse_time(m.get("created"))
        if end:
            ends.append(end)
            starts.append(end - dt.timedelta(seconds=float(m.get("timings", {}).get("wall_s") or 0)))
    span = f", {(max(ends) - min(starts)).total_seconds():.0f} s from the first stage's start to the last's end" \
        if ends else ""
    line = (f"`{target}` at commit {', '.join(f'`{c}`' for c in commits)}; {machine()}; device "
            f"{', '.join(devices)}; {wall:.0f} s of stage wall time over {len(stages)} stages{span}.\n")
    rows = ["| artifact | kind | wall s | device | commit |", "|---|---|---:|---|---|"]
    rows += [f"| `{_short(p)}` | {m.get('kind')} | {float(m.get('timings', {}).get('wall_s') or 0):.1f} | "
             f"{m.get('device', '–')} | `{str(m.get('git_commit') or 'unknown')[:12]}` |" for p, m in stages]
    return line, rows


def _short(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


# --- pages --------------------------------------------------------------------------------------
FIGURE_LINK = re.compile(r"\]\(([\w.-]+\.png)\)")


def page_figures(eval_dir: Path, out: Path) -> list[Path]:
    """Copy each figure the eval's results.md links to (e.g. `loss_curves.png`) beside the page at
    `out`, as `<page name>-<figure>`, so the page's links resolve in the repository."""
    import shutil

    text = (eval_dir / "results.md").read_text(encoding="utf-8")
    copied = []
    for fig in sorted(set(FIGURE_LINK.findall(text))):
        if (eval_dir / fig).is_file():
            dest = out.parent / f"{out.stem}-{fig}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(eval_dir / fig, dest)
            copied.append(dest)
    return copied


def eval_page(name: str, eval_dir: Path, target: str, out: Path | None = None) -> str:
    """A curriculum's page: the stamp and the summary table of the eval's results.md as the
    headline, then the full results.md and the stages. The split the eval scored is named when it
    is not test; links to the eval artifact's figures are made relative to the page at `out`."""
    results = (eval_dir / "results.md").read_text(encoding="utf-8").splitlines()
    if out is not None:  # the figures results.md links to are copied beside the page (`page_figures`)
        results = [FIGURE_LINK.sub(lambda m: f"]({Path(out).stem}-{m[1]})", ln) for ln in results]
    legend = next((ln for ln in results[1:] if ln.strip() and not ln.startswith("#")), "")
    first = next(i for i, ln in enumerate(results) if ln.startswith("|"))
    end = next((i for i in range(first, len(results)) if not results[i].startswith("|")), len(results))
    table = results[first:end]
    line, rows = stamp(target, lineage_manifests(eval_dir))
    split = json.loads((eval_dir / "manifest.json").read_text()).get("split", "test")
    if split != "test":
        line = line.rstrip("\n").rstrip(".") + f"; scored on the world's **{split}** split.\n"
    head = line + "\n" + legend + "\n\n" + "\n".join(table) + "\n"
    rest = [("#" + ln if ln.startswith("#") else ln) for ln in results[end:]]
    body = ("## Every metric\n" + "\n".join(rest).rstrip() + "\n\n## Stages\n\n"
            "Each artifact the table depends on (the evaluation and its lineage), with its own wall time "
            "(`timings.wall_s` in its manifest).\n\n" + "\n".join(rows) + "\n")
    return page(f"`{target}`", head, body)


def _lineages(dirs: list[Path]) -> list[tuple[Path, dict]]:
    """The manifests of `dirs` and of every artifact in their lineages, each once."""
    seen: dict[Path, dict] = {}
    for d in dirs:
        for p, m in lineage_manifests(d):
            seen.setdefault(p, m)
    return list(seen.items())


def _stages_body(rows: list[str]) -> str:
    return ("## Stages\n\nEach artifact the table depends on, with its own wall time (`timings.wall_s` in its "
            "manifest).\n\n" + "\n".join(rows) + "\n")


def epochs_page(name: str, student: Path, target: str) -> str:
    """A train-student run with `epoch_eval`: its per-epoch table (epochs.md) as the headline."""
    table = (student / "epochs.md").read_text(encoding="utf-8")
    m = json.loads((student / "manifest.json").read_text())
    r = m.get("recipe", {})
    line, rows = stamp(target, _lineages([student]))
    legend = (f"`{_short(student)}`: distill_weight {r.get('distill_weight')}, teacher epoch {r.get('teacher_epoch')}, "
              f"{r.get('epoch_eval_split')} split ({r.get('epoch_eval_images')} images at most; captions kept where "
              f"no other of them has it); epoch 0 is the CLIP it starts from. All numbers ×100.\n")
    return page(f"`{target}`", line + "\n" + legend + "\n" + table,
                f"The curves: `{_short(student / 'epochs.png')}` (not committed: runs stay out of git).\n\n"
                + _stages_body(rows))


#: the sweep page's columns: (epoch_eval key suffix, label)
SWEEP_COLUMNS = (("retrieval/mean_recall", "mR"), ("retrieval/image_retrieval_recall@1", "T→I R@1"),
                 ("retrieval/text_retrieval_recall@1", "I→T R@1"), ("zeroshot/acc1", "zero-shot acc1"),
                 ("zeroshot/mean_per_class_recall", "zero-shot mPCR"))


def sweep_page(name: str, students: list[Path], target: str) -> str:
    """train-student runs with `epoch_eval`, one row each: their recipe's distill_weight and length,
    and their last epoch's held-out metrics; first the CLIP they start from (their epoch 0)."""
    header = ["model", "distill_weight", "epochs", "steps"] + [label for _, label in SWEEP_COLUMNS]
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    split, base = None, None
    for d in students:
        m = json.loads((d / "manifest.json").read_text())
        rows = sorted(m.get("epoch_eval") or [], key=lambda row: row["epoch"])
        if not rows:
            raise SystemExit(f"{d} has no epoch_eval rows; train it with epoch_eval: true")
        split = m["recipe"].get("epoch_eval_split", "val")
        cells = lambda row: [f"{100 * row[k]:.1f}" if isinstance(row.get(k), (int, float)) else ""  # noqa: E731
                             for k in (f"{split}_{suffix}" for suffix, _ in SWEEP_COLUMNS)]
        if base is None:
            base = "| base CLIP (epoch 0) | – | 0 | 0 | " + " | ".join(cells(rows[0])) + " |"
        r = m["recipe"]
        out.append(f"| `{d.name}` | {r.get('distill_weight')} | {rows[-1]['epoch']} | {rows[-1]['step']} | "
                   + " | ".join(cells(rows[-1])) + " |")
    out.insert(2, base)
    line, stages = stamp(target, _lineages(students))
    legend = (f"Each student scored on the {split} split after its last epoch (never the test split); all numbers "
              f"×100; mR: mean of R@1/5/10 both ways.\n")
    return page(f"`{target}`", line + "\n" + legend + "\n" + "\n".join(out) + "\n", _stages_body(stages))


def bench_page(results: dict) -> str:
    """`make bench`'s page: every figure against its baseline and goal, stamped."""
    cond = results.get("conditions", {})
    wall = sum(float(p.get("details", {}).get("wall_s") or 0) for p in results["parts"].values())
    line = (f"`make bench` at commit `{str(cond.get('git_commit') or 'unknown')[:12]}`; {cond.get('cpus')} CPU "
            f"cores ({cond.get('machine')}), torch {cond.get('torch')}; device {cond.get('device', 'cpu')}; {wall:.0f} s over parts "
            f"{', '.join(results['parts'])}; load average {cond.get('load_avg_1m', 0):.1f} at start.\n")
    rows = ["| part | measure | vla | baseline | ratio | goal | |", "|---|---|---:|---:|---:|---:|---|"]
    notes = []
    for name, part in results["parts"].items():
        for f in part["figures"]:
            goal = ("≥ " if f.get("higher_is_better", True) else "≤ ") + f"{f['goal']:.2f}"
            rows.append(f"| {name} | {f['what']} ({f['unit']}) | {f['vla']:,.2f} | {f['baseline']:,.2f} | "
                        f"{f['ratio']:.2f}× {f['ratio_is']} | {goal} | {'met' if f['met'] else 'not met'} |")
        notes.append(f"- {name}: {part['title']} — baseline: {part['baseline']}")
    head = line + "\n" + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"
    return page("`make bench`", head, "Sizes and raw numbers per part: `bench/results.json`.\n")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- the README ---------------------------------------------------------------------------------
def readme_text(readme: str, results_dir: Path) -> str:
    """README text with every `<!-- results:NAME -->` block set to docs/results/NAME.md's headline."""
    def fill(m: re.Match) -> str:
        name = m.group("name")
        f = results_dir / f"{name}.md"
        body = headline(f.read_text(encoding="utf-8"), str(f)) if f.is_file() else placeholder(name)
        return m.group(1) + body + m.group(4)
    return README_BLOCK.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vla.docs", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="write a curriculum's page from its eval artifact")
    e.add_argument("name")
    e.add_argument("eval_dir", type=Path)
    e.add_argument("--make", required=True, help="the make target that built it, e.g. 'make proclip'")
    e.add_argument("--out", type=Path, help="default: docs/results/NAME.md")
    ep = sub.add_parser("epochs", help="write a page from a train-student run's per-epoch evaluation")
    ep.add_argument("name")
    ep.add_argument("student", type=Path)
    ep.add_argument("--make", required=True)
    ep.add_argument("--out", type=Path, help="default: docs/results/NAME.md")
    sw = sub.add_parser("sweep", help="write a page from several train-student runs' last per-epoch evaluation")
    sw.add_argument("name")
    sw.add_argument("students", type=Path, nargs="+")
    sw.add_argument("--make", required=True)
    sw.add_argument("--out", type=Path, help="default: docs/results/NAME.md")
    b = sub.add_parser("bench", help="write docs/results/bench.md from bench/results.json")
    b.add_argument("--json", type=Path, default=Path(os.environ.get("VLA_BENCH_DIR", "bench")) / "results.json")
    b.add_argument("--out", type=Path, default=RESULTS_DIR / "bench.md")
    r = sub.add_parser("readme", help="regenerate README.md's result blocks from docs/results/")
    r.add_argument("--check", action="store_true", help="change nothing; exit 1 if README.md differs")
    r.add_argument("--root", type=Path, default=Path("."))
    a = ap.parse_args(argv)

    if a.cmd == "eval":
        if not (a.eval_dir / "results.md").is_file():
            print(f"error: {a.eval_dir} has no results.md; give the eval artifact `make` built", file=sys.stderr)
            return 2
        out = a.out or RESULTS_DIR / f"{a.name}.md"
        write(out, eval_page(a.name, a.eval_dir, a.make, out))
        page_figures(a.eval_dir, out)
        print(f"wrote {out}; `python -m vla.docs readme` copies its table into README.md")
    elif a.cmd in ("epochs", "sweep"):
        dirs = [a.student] if a.cmd == "epochs" else a.students
        missing = [d for d in dirs if not (d / "manifest.json").is_file()]
        if missing:
            print(f"error: {missing[0]} is no finished artifact; give the train-student runs `make` built",
                  file=sys.stderr)
            return 2
        out = a.out or RESULTS_DIR / f"{a.name}.md"
        write(out, epochs_page(a.name, a.student, a.make) if a.cmd == "epochs" else sweep_page(a.name, dirs, a.make))
        print(f"wrote {out}")
    elif a.cmd == "bench":
        results = json.loads(a.json.read_text()) if a.json.is_file() else None
        if results is None or results.get("quick"):
            print(f"{a.out} not written: {a.json} " + ("is a --quick run (smoke sizes, not figures)"
                                                       if results else "does not exist"), file=sys.stderr)
            return 0 if results else 2
        write(a.out, bench_page(results))
        print(f"wrote {a.out}; `python -m vla.docs readme` copies its table into README.md")
    else:
        readme = a.root / "README.md"
        old = readme.read_text(encoding="utf-8")
        new = readme_text(old, a.root / RESULTS_DIR)
        if a.check:
            if new != old:
                print("README.md's result blocks differ from docs/results/: run `python -m vla.docs readme`",
                      file=sys.stderr)
                return 1
            return 0
        if new != old:
            write(readme, new)
        print("README.md " + ("updated from docs/results/" if new != old else "already matches docs/results/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
