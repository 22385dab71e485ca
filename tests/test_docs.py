"""The documentation holds together: README.md's result rows are docs/results/'s, every relative
link resolves, every method reference in the code names a section of docs/methods.md, and a
results page carries its stamp (commit, machine, device, wall time)."""

import json
import re
import subprocess
import sys
from pathlib import Path

from vla import docs

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_rows_are_the_results_pages():
    """Each `<!-- results:NAME -->` block of README.md is docs/results/NAME.md's headline, and
    every curriculum and the bench have a block (`python -m vla.docs readme` writes them)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert docs.readme_text(readme, ROOT / "docs" / "results") == readme, \
        "README.md differs from docs/results/: run `python -m vla.docs readme`"
    assert {m.group("name") for m in docs.README_BLOCK.finditer(readme)} == set(docs.PAGES)
    r = subprocess.run([sys.executable, "-m", "vla.docs", "readme", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_readme_is_a_front_door():
    """README.md stays short; the rest lives in docs/."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file."""
    found, seen = set(), {}
    in_code = False
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def test_every_relative_link_resolves():
    """Every relative link in README.md and docs/ names a file or directory of the repository,
    and its #anchor, when it has one, a heading of that file."""
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.is_file() and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_method_references_resolve_inside_the_repository():
    """The code cites docs/methods.md (§N naming one of its sections), never a file outside the
    repository."""
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "methods.md").read_text(), re.M))
    files = [p for d in ("vla", "tests", "recipes") for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml")]
    files += [ROOT / "Makefile", ROOT / "README.md"]
    for f in files:
        text = f.read_text(encoding="utf-8")
        if f.name != "test_docs.py":
            assert not re.search(r"(?<!docs/)(METHODS|DESIGN)\.md", text), f
        for n in re.findall(r"docs/methods\.md §(\d+)", text):
            assert n in sections, f"{f}: docs/methods.md §{n}"


# --- results pages ------------------------------------------------------------------------------
def _artifact(path: Path, kind: str, wall: float, created: str, inputs: dict, **extra) -> dict:
    path.mkdir(parents=True)
    m = {"kind": kind, "git_commit": "abc1234def5678", "created": created, "digest": f"d-{path.name}",
         "timings": {"wall_s": wall}, "inputs": inputs, **extra}
    (path / "manifest.json").write_text(json.dumps(m))
    return {"path": str(path), "kind": kind, "digest": m["digest"], "created": created, "inputs": inputs}


def test_an_eval_page_is_stamped_from_the_artifacts_it_depends_on(tmp_path, monkeypatch):
    """`python -m vla.docs eval` writes the summary table with a stamp: the artifacts' commit, the
    machine's cores and torch, their device, the sum of their wall times over the eval and its
    lineage (each artifact once), and the span from the first start to the last end; then
    `readme` copies that headline into the README's block."""
    clip = _artifact(tmp_path / "runs" / "clip", "pretrain", 100.0, "2026-01-01T00:01:40+00:00", {}, device="cpu")
    tuned = _artifact(tmp_path / "runs" / "contrast", "contrast-tune", 50.0, "2026-01-01T00:03:00+00:00",
                      {"clip": clip}, device="cpu")
    ev = tmp_path / "runs" / "eval"
    _artifact(ev, "eval", 10.0, "2026-01-01T00:04:00+00:00", {"model0": clip, "model1": tuned}, device="cpu")
    (ev / "results.md").write_text("# Evaluation results\n\nAll numbers ×100.\n\n| model | retrieval mR |\n"
                                   "|---|---:|\n| CLIP (clip) | 50.0 |\n\n## retrieval\n\n| model | x |\n|---|---|\n")
    (tmp_path / "README.md").write_text("intro\n<!-- results:proclip -->\nold\n<!-- /results -->\nend\n")
    monkeypatch.chdir(tmp_path)
    assert docs.main(["eval", "proclip", str(ev), "--make", "make proclip"]) == 0
    text = (tmp_path / "docs" / "results" / "proclip.md").read_text()
    head = docs.headline(text)
    assert "`make proclip` at commit `abc1234def56`" in head
    assert "torch " in head and "CPU cores" in head and "device cpu" in head
    assert "160 s of stage wall time over 3 stages" in head  # clip counted once
    assert "240 s from the first stage's start" in head      # 00:00:00 → 00:04:00
    assert "| CLIP (clip) | 50.0 |" in head and "All numbers ×100." in head
    assert "## Stages" in text and "| pretrain | 100.0 |" in text
    assert docs.main(["readme", "--check"]) == 1
    assert docs.main(["readme"]) == 0 and docs.main(["readme", "--check"]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert head in readme and "old" not in readme and readme.endswith("<!-- /results -->\nend\n")


def test_a_page_not_yet_written_says_so():
    """A results page that its make target has not written is a placeholder naming the target."""
    block = docs.readme_text("<!-- results:mmgem -->\n<!-- /results -->", Path("/nonexistent"))
    assert "Not yet generated: `make mmgem`" in block


def test_a_quick_bench_writes_no_results_page(tmp_path):
    """`make bench BENCH_FLAGS=--quick` measures smoke sizes: no page; a full run gets a stamped one."""
    results = {"quick": True, "conditions": {"cpus": 2, "torch": "2.14.1", "machine": "x86_64", "device": "cpu",
                                             "git_commit": "abc1234", "load_avg_1m": 0.1},
               "parts": {"c": {"title": "retrieval eval", "baseline": "full matrices", "details": {"wall_s": 12.0},
                               "figures": [{"what": "time", "unit": "s", "vla": 1.0, "baseline": 4.0, "ratio": 4.0,
                                            "ratio_is": "speed-up", "goal": 3.0, "higher_is_better": True,
                                            "met": True}]}}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    out = tmp_path / "bench.md"
    assert docs.main(["bench", "--json", str(tmp_path / "r.json"), "--out", str(out)]) == 0 and not out.exists()
    (tmp_path / "r.json").write_text(json.dumps({**results, "quick": False}))
    assert docs.main(["bench", "--json", str(tmp_path / "r.json"), "--out", str(out)]) == 0
    head = docs.headline(out.read_text())
    assert "`make bench` at commit `abc1234`; 2 CPU cores (x86_64), torch 2.14.1; device cpu; 12 s" in head
    assert "| c | time (s) | 1.00 | 4.00 | 4.00× speed-up | ≥ 3.00 | met |" in head


def test_each_make_target_writes_its_results_page():
    """The default runs of each curriculum (and `make bench`) end by writing docs/results/NAME.md
    from their eval artifact and copying it into the README; a run elsewhere writes no page
    unless it names one, so a test's or a real-model run's table never replaces the embedded one."""
    def dry(*args):
        r = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    for target, evals in (("proclip", "runs/proclip/eval"), ("dclip", "runs/dclip/eval"),
                          ("dclip-ablations", "runs/dclip/ablations/eval"), ("mmgem", "runs/mmgem/eval")):
        out = dry(target)
        assert (f"-m vla.docs eval {target} {evals} --make 'make {target}' --out docs/results/{target}.md "
                f"&& .venv/bin/python -m vla.docs readme") in out, out[-2000:]
    assert "vla.docs" not in dry("proclip", "RUNS=/tmp/elsewhere")
    assert "--out docs/results/proclip-vitl.md" in dry("proclip", "RUNS=runs/proclip-vitl",
                                                       "PROCLIP_PAGE=docs/results/proclip-vitl.md")
    assert "-m vla.docs bench && .venv/bin/python -m vla.docs readme" in dry("bench")


def _student(path: Path, weight: float, rows: list[dict], created: str) -> None:
    _artifact(path, "train-student", 60.0, created, {}, device="cpu",
              recipe={"distill_weight": weight, "teacher_epoch": 2, "epoch_eval_split": "val", "epoch_eval_images": 1000},
              epoch_eval=rows)


def test_epochs_and_sweep_pages_come_from_the_students_per_epoch_evaluation(tmp_path, monkeypatch):
    """`python -m vla.docs epochs` puts a student's epochs.md under a stamp; `sweep` gives one row per
    student (its distill_weight, last epoch and step, and that epoch's val metrics ×100) under the
    base CLIP's row (epoch 0); a directory that is no finished artifact is refused."""
    def row(epoch, step, r1):
        return {"epoch": epoch, "step": step, "val_retrieval/mean_recall": 0.5 + r1, "val_zeroshot/acc1": 0.3,
                "val_retrieval/image_retrieval_recall@1": r1, "val_retrieval/text_retrieval_recall@1": 0.2,
                "val_zeroshot/mean_per_class_recall": 0.25}
    a, b = tmp_path / "runs" / "w1-e2", tmp_path / "runs" / "w2-e4"
    _student(a, 1.0, [row(0, 0, 0.1), row(1, 62, 0.12), row(2, 124, 0.15)], "2026-01-01T00:01:00+00:00")
    _student(b, 2.0, [row(0, 0, 0.1), row(4, 248, 0.175)], "2026-01-01T00:02:00+00:00")
    (a / "epochs.md").write_text("| epoch | step | val text→image R@1 |\n|---:|---:|---:|\n| 0 | 0 | 10.0 |\n")
    monkeypatch.chdir(tmp_path)
    assert docs.main(["epochs", "dclip-epochs", str(a), "--make", "make dclip-epochs"]) == 0
    head = docs.headline((tmp_path / "docs" / "results" / "dclip-epochs.md").read_text())
    assert "`make dclip-epochs` at commit `abc1234def56`" in head and "| 0 | 0 | 10.0 |" in head
    assert "distill_weight 1.0, teacher epoch 2, val split" in head

    assert docs.main(["sweep", "s", str(a), str(b), "--make", "make dclip-sweep"]) == 0
    head = docs.headline((tmp_path / "docs" / "results" / "s.md").read_text())
    lines = [ln for ln in head.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| model | distill_weight | epochs | steps | mR | T→I R@1 |")
    assert lines[1] == "| base CLIP (epoch 0) | – | 0 | 0 | 60.0 | 10.0 | 20.0 | 30.0 | 25.0 |"
    assert lines[2] == "| `w1-e2` | 1.0 | 2 | 124 | 65.0 | 15.0 | 20.0 | 30.0 | 25.0 |"
    assert lines[3] == "| `w2-e4` | 2.0 | 4 | 248 | 67.5 | 17.5 | 20.0 | 30.0 | 25.0 |"
    assert "120 s of stage wall time over 2 stages" in head
    assert docs.main(["sweep", "s", str(tmp_path / "missing"), "--make", "make dclip-sweep"]) == 2


def test_an_eval_page_on_val_says_so_and_its_figures_are_copied_beside_it(tmp_path, monkeypatch):
    """An eval scored on the val split is stamped as such; a figure results.md links to
    (loss_curves.png) is copied beside the page as `<page>-<figure>` and the page links to that copy."""
    ev = tmp_path / "runs" / "eval"
    _artifact(ev, "eval", 10.0, "2026-01-01T00:04:00+00:00", {}, device="cpu", split="val")
    (ev / "results.md").write_text("# Evaluation results\n\nAll numbers ×100.\n\n| model | retrieval mR |\n"
                                   "|---|---:|\n| a | 1.0 |\n\n## Training\n\nCurves: [loss_curves.png](loss_curves.png).\n")
    (ev / "loss_curves.png").write_bytes(b"png bytes")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "docs" / "results" / "sweep.md"
    assert docs.main(["eval", "sweep", str(ev), "--make", "make sweep", "--out", str(out)]) == 0
    text = out.read_text()
    assert "scored on the world's **val** split" in docs.headline(text)
    assert "[loss_curves.png](sweep-loss_curves.png)" in text
    assert (out.parent / "sweep-loss_curves.png").read_bytes() == b"png bytes"
