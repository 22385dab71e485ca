"""Runs a list of `vla` commands in one process, alone or as each rank of a `torchrun`
(tests/test_invariance.py).

    python tests/invariance_worker.py PLAN.json RESULTS
    torchrun --standalone --nproc-per-node 2 tests/invariance_worker.py PLAN.json RESULTS

PLAN.json is a list of {"name": ..., "args": [...]}, each a `vla` command line run through the CLI
as a user runs it (one import of torch for all of them). Every rank writes what each command did
to RESULTS/<name>/rank<r>.json ({"exit_code", "output"}): the test reads those files and the
artifacts, never the processes' shared stdout. Artifacts keep their `checkpoints/` here (the
optimizer state after the step is what the test compares).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(plan: Path, results: Path) -> int:
    from typer.testing import CliRunner

    from vla.artifacts import ArtifactBuilder
    from vla.cli import app

    ArtifactBuilder.__init__.__kwdefaults__["keep_checkpoints"] = True
    rank = int(os.environ.get("RANK", 0))
    failed = 0
    for entry in json.loads(plan.read_text()):
        result = CliRunner().invoke(app, entry["args"], env={"VLA_NO_PROGRESS": "1"})
        out = result.output[-4000:]
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            out += f"\n{type(result.exception).__name__}: {result.exception}"
        where = results / entry["name"]
        where.mkdir(parents=True, exist_ok=True)
        (where / f"rank{rank}.json").write_text(json.dumps({"exit_code": result.exit_code, "output": out}))
        failed += result.exit_code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
