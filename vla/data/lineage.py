"""Is a per-sample table from this data? The check every stage makes before pairing rows by key.

A table built from data (the regions table, teacher targets) is read by sample key. Two data sets
can share their keys — two synthetic worlds with different seeds do, and so do two img2dataset
runs over different URL lists — so a key found is no proof that the row belongs to this sample.
The table records the digest of the data it was built from (`DataSource.digest`: each shard's
name, size and modification time); a stage compares it with its `--data` and refuses another
data set in one line, before any compute.
"""

from __future__ import annotations

from pathlib import Path

from vla.errors import UserError


def check_built_from(table: str | Path, recorded_digest: str | None, recorded_path: str | None,
                     data: str | Path, rebuild: str) -> None:
    """UserError when `table` was built from other data than `data` (digests differ). `rebuild`
    is the command that rebuilds the table from `data`. A table that records no digest (made by
    an older vla) is not checked."""
    from vla.data.stream import resolve_data

    if not recorded_digest:
        return
    digest = resolve_data(data).digest()
    if digest == recorded_digest:
        return
    built = f"{recorded_path}, " if recorded_path else ""
    raise UserError(f"{table} was built from other data ({built}data digest {recorded_digest[:12]}) than --data "
                    f"{data} (digest {digest[:12]}): its rows would pair one sample's features with another's "
                    f"caption; pass the data it was built from, or rebuild it with `{rebuild}` (a copy of the "
                    f"data keeps its digest only with its modification times: cp -p, rsync -a)")
