"""Offline-first process set-up for the libraries vla drives (huggingface_hub, ultralytics).

vla runs where only package registries are reachable. Without these settings every hub miss costs
20–45 s of retries and ultralytics tries to download fonts and phone home; with them, a missing
model is a clear error at once. A user with network opts out with `VLA_ONLINE=1` or an explicit
`HF_HUB_OFFLINE=0`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

_TRUE = {"1", "true", "yes", "on"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def is_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (the same test huggingface_hub uses)."""
    return _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def configure_offline() -> None:
    """Set the offline environment; idempotent, call before the heavy libraries are used."""
    if not _env_true("VLA_ONLINE") and "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if is_offline() and "huggingface_hub.constants" in sys.modules:
        # huggingface_hub reads the variable once at import; keep an early import consistent.
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if is_offline():
        os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS probes, downloads or analytics
    # model-loading progress bars and advisories are noise in a stage's output
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    config_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".cache" / "vla" / "yolo")))
    _install_fonts(config_dir.expanduser() / "Ultralytics")


def _install_fonts(ultralytics_dir: Path) -> None:
    """ultralytics' plotting asks for Arial and downloads it when missing: give it DejaVuSans."""
    targets = [ultralytics_dir / name for name in ("Arial.ttf", "Arial.Unicode.ttf")]
    if all(t.exists() for t in targets):
        return
    import matplotlib  # only on the first run: it is slow to import

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    ultralytics_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if not target.exists():
            shutil.copyfile(source, target)


def import_ultralytics() -> ModuleType:
    """Import ultralytics offline-configured, keeping torch's thread count (it lowers it to cores−1)."""
    configure_offline()
    omp = os.environ.get("OMP_NUM_THREADS")
    with torch_threads_kept():
        import ultralytics
        from ultralytics.utils import SETTINGS

        if SETTINGS.get("sync", True):
            SETTINGS.update(sync=False)  # no analytics events
    if omp is None:
        # ultralytics sets OMP_NUM_THREADS=1 for child processes (data loaders); undo that too.
        os.environ.pop("OMP_NUM_THREADS", None)
    return ultralytics


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """ultralytics' `select_device` lowers torch's threads on every predict/train: put them back."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
