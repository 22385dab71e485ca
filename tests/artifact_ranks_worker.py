"""Two ranks enter one `ArtifactBuilder` under torchrun (tests/test_reliability.py).

    torchrun --standalone --nproc-per-node 2 tests/artifact_ranks_worker.py OUT FOREIGN RESULTS

OUT holds a stale partial that `--force` replaces; rank 0 is slow to get there, so a rank that
did not wait for it would see the stale checkpoint. FOREIGN is a directory vla must refuse: rank 0's
error must reach rank 1 too. Each rank writes what it saw to RESULTS/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vla.artifacts import ArtifactBuilder
from vla.distributed import init_distributed
from vla.errors import UserError


def main(out: Path, foreign: Path, results: Path) -> None:
    info = init_distributed("cpu")
    if info.rank == 0:
        time.sleep(2)  # rank 0 is slow: the other rank must wait for it all the same
    with ArtifactBuilder(out, "pretrain", recipe={"lr": 2}, force=True, command=["test"]) as art:
        stale = (art.dir / "checkpoints" / "last.pt").exists()
        if info.rank == 0:
            (art.dir / "w.bin").write_bytes(b"w")
    error = None
    try:
        with ArtifactBuilder(foreign, "pretrain", recipe={}, force=True, command=["test"]):
            pass
    except UserError as e:
        error = str(e)
    (results / f"rank{info.rank}.json").write_text(json.dumps({"stale_checkpoint": stale, "error": error}))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:4]))
