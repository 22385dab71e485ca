"""The floors of vla's imports: a stage never imports another stage, nothing below the stages
imports a stage, nothing imports another module's private name across a stage boundary, and no
import runs back up the floors (data → models → stages → cli)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "vla"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names imported from it) for every `import` / `from ... import` in a file,
    relative imports resolved."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}
SHARED_STAGE_MODULES = ("vla.stages", "vla.stages.common")


def _is_stage(module: str) -> bool:
    return module.startswith("vla.stages.") and module not in SHARED_STAGE_MODULES


def test_no_stage_imports_another_stage():
    """What two stages share lives on a floor below (vla/data, vla/models, vla/stages/common.py)."""
    bad = [(m, t) for m, imports in MODULES.items() if _is_stage(m)
           for t, _ in imports if _is_stage(t) and t != m]
    assert not bad, bad


def test_no_module_below_the_stages_imports_a_stage():
    """vla/data, vla/models, vla/evaluate and the shared modules never reach up to a stage; only the
    CLI, the stage registry, the benches and the GPU check (which run stages) do."""
    above = ("vla.cli", "vla.stages", "vla.bench", "vla.gpucheck", "vla.docs", "vla.__main__")
    bad = [(m, t) for m, imports in MODULES.items() if not m.startswith(above)
           for t, _ in imports if _is_stage(t)]
    assert not bad, bad


def test_no_private_name_of_a_stage_is_imported_elsewhere():
    """A bench or a stage uses a stage's public step and batch builders, never its `_private` helpers."""
    bad = [(m, t, n) for m, imports in MODULES.items() for t, names in imports
           if _is_stage(t) and t != m for n in names if n.startswith("_")]
    assert not bad, bad


#: the floors, lowest first: a module imports only from its own floor or below
FLOORS = [
    ("vla.errors", "vla.offline", "vla.progress", "vla.__version__"),
    ("vla.artifacts", "vla.claim", "vla.locks", "vla.recipes", "vla.checkpoint", "vla.distributed", "vla.optim", "vla.textbatch"),
    ("vla.data",),
    ("vla.models", "vla.losses"),
    ("vla.cache", "vla.train", "vla.reporter"),
    ("vla.evaluate",),
    ("vla.stages",),
    ("vla.bench", "vla.gpucheck", "vla.docs", "vla.cli", "vla.__main__", "vla"),
]


def _floor(module: str) -> int:
    best = None
    for i, prefixes in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[0]


def test_no_import_runs_back_up_the_floors():
    """data → models/losses → cache/train → evaluate → stages → cli: `vla.load` lives in
    vla/models/load.py, the export stage in vla/stages/export.py, DCLIP's teacher inputs in
    vla/models/dclip/; `from vla import X` counts as importing vla.X."""
    bad = []
    for m, imports in MODULES.items():
        for t, names in imports:
            if not t.startswith("vla"):
                continue
            targets = [f"{t}.{n}" if t == "vla" else t for n in (names or [""])] if t == "vla" and names else [t]
            bad += [(m, x) for x in targets if _floor(x) > _floor(m)]
    assert not bad, bad
