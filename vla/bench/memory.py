"""Peak memory of one call, as the kernel counts it, above this process' own baseline.

`peak_rss(fn)` runs `fn()` once and reports how far the process' resident set rose above what it
held just before: the kernel's high-water mark (VmHWM, what `ru_maxrss` reports), reset to the
current RSS just before the call (Linux >= 4.0, /proc/self/clear_refs), minus that RSS. Without
the reset the mark would still hold every earlier peak of the process, and, in a child started
by fork + exec, the parent's RSS at the fork.

Before the call, glibc's mmap threshold is fixed at 128 KiB (`mallopt`) and free heap memory is
returned (`malloc_trim`). glibc otherwise raises its threshold (up to 32 MiB) each time a large
mmapped block is freed, after which blocks of that size come from the heap, which keeps freed
memory and fragments: the same computation then peaks anywhere between the memory it uses and
several times that, depending on the order of its allocations and on which thread made them.
With the threshold fixed, every large tensor is its own mapping, returned to the system when
freed, and the peak measures memory in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from typing import Any, Callable

M_MMAP_THRESHOLD = -3    # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 128 * 1024


def status_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM, ...) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def fix_malloc() -> bool:
    """Fix glibc's mmap threshold and give free heap memory back; False where libc is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def reset_peak() -> float:
    """Reset the RSS high-water mark to the current RSS; return that RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mb("VmRSS")


def peak_rss(fn: Callable[[], Any]) -> dict:
    """Run `fn()` once: {"result", "seconds", "peak_mb" (the rise of the RSS above `baseline_mb`),
    "baseline_mb" (the RSS just before, inputs and imports included), "total_peak_mb"
    (the process' whole peak during the call), "malloc_fixed"}."""
    gc.collect()
    fixed = fix_malloc()
    base = reset_peak()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    top = status_mb("VmHWM")
    return {"result": result, "seconds": seconds, "peak_mb": top - base, "baseline_mb": base,
            "total_peak_mb": top, "malloc_fixed": fixed}
