"""One writer per `--out`: the builder of an artifact holds an exclusive `flock` on the sibling
`.NAME.lock` (rank 0 under torchrun) until the artifact is finished; a second writer is refused,
naming the process that holds it (pid, host, since when). The lock file is removed when the
artifact is finished; a stale one left by a killed run is ignored (no live process holds it).
`vla.artifacts.claim_out` takes the lock; the CLI gives up every held lock when a command ends.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from vla.errors import UserError


def lock_path(out: Path) -> Path:
    """The file whose `flock` makes one process the writer of `out` (beside its partial)."""
    return out.parent / f".{out.name}.lock"


class _WriterLock:
    """An exclusive `flock` on `.NAME.lock`, whose content names the holder (pid, host, command).

    The file is removed when the artifact is finished. A process that opened the file before
    it was removed could lock the removed file: it checks, after locking, that the path still
    leads to the file it locked, and retries otherwise."""

    def __init__(self, out: Path):
        self.out, self.path, self.fd = out, lock_path(out), None

    def acquire(self) -> None:
        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # --out may name new directories
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"--out {self.out}: cannot create {self.path} ({e.strerror}); choose an "
                                f"--out in a directory you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise UserError(f"{self.out} is being built by another vla run ({describe_holder(read_holder(self.out))}); "
                                f"wait for it to finish, or choose another --out") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still held, so no other process can hold the removed file
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


_HELD: dict[Path, _WriterLock] = {}  # the writer locks this process holds, by resolved --out


def acquire(out: Path) -> None:
    """Take `out`'s writer lock for this process (kept if it already holds it); UserError when
    another process holds it."""
    key = out.resolve()
    if key not in _HELD:
        lock = _WriterLock(out)
        lock.acquire()
        _HELD[key] = lock


def release(out: str | Path) -> None:
    """Give up this process' writer lock on `out` (when its build ends, finished or not)."""
    lock = _HELD.pop(Path(out).resolve(), None)
    if lock is not None:
        lock.release()


def release_all() -> None:
    """Give up every writer lock this process holds (the CLI calls it when a command ends)."""
    for key in list(_HELD):
        _HELD.pop(key).release()


def read_holder(out: Path) -> dict[str, Any] | None:
    """Who holds `out`'s writer lock, or None when no live process does."""
    out = Path(out)
    if out.resolve() in _HELD:
        return {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        fd = os.open(lock_path(out), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held: read who holds it
            try:
                return json.loads(os.read(fd, 65536) or b"{}")
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # a stale file left by a killed run
    finally:
        os.close(fd)


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "a process that has just started"
    where = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    return where + (f", since {holder['started']}" if holder.get("started") else "")
