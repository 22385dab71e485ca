"""The commands that read what the stages wrote and the recipes: `vla inspect` (a manifest and its
lineage; --verify re-hashes the outputs), `vla models` (the registry's names and the model
artifacts on disk), `vla recipe show` and `vla eval-merge`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.tree import Tree

from vla.cli.shape import SetOpt, StdoutConsole, app, console, err_console, handles_errors, recipe_app
from vla.errors import UserError, VlaError


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
        (console if console.is_terminal else StdoutConsole(width=10_000)).print(tree)
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
