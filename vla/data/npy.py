"""Reading a `.npy` table file, with damage (a cut or overwritten file) as a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vla.errors import UserError


def open_npy(path: str | Path, *, fix: str, mmap: bool = True) -> np.ndarray:
    """The array in `path` (memory-mapped by default, never unpickled); UserError naming the file
    and `fix` (what rebuilds it) when it is missing, cut short or not a `.npy`."""
    path = Path(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {fix}") from None
    except (ValueError, OSError, EOFError) as e:  # numpy's words for a cut or foreign file
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} is damaged ({why}); {fix}") from None


def npy_intact(path: str | Path, shape: tuple[int | None, ...]) -> bool:
    """Whether `path` reads as a `.npy` of `shape` (None: any size on that axis)."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    return len(a.shape) == len(shape) and all(w is None or w == n for w, n in zip(shape, a.shape))
