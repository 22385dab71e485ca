"""Training checkpoints: everything needed to resume a run bit-for-bit, and nothing pickled.

One file, `checkpoints/last.pt`, replaced atomically (write a temporary sibling, fsync, rename),
so a crash mid-write leaves the previous checkpoint intact. Beside it, `last.json` says its step,
so that a message can say where a rerun resumes without loading torch or the checkpoint. It holds plain tensors, numbers and
dicts only, and is read back with `torch.load(weights_only=True)`, so loading a checkpoint can
never run code. RNG states are therefore stored as tensors, one entry per rank (dropout differs
between ranks).
"""

from __future__ import annotations

import json
import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vla.errors import StageError, UserError

FORMAT = "vla-train-checkpoint"
VERSION = 1


def capture_rng() -> dict[str, Any]:
    """This process' python, numpy, torch-CPU and current-GPU generator states, as tensors."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_gauss": (int(np_has_gauss), float(np_gauss)),
        "torch": torch.get_rng_state(),
        # Only the current device: get_rng_state_all() would open a context on every visible GPU.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    random.setstate(
        (state["python_version"], tuple(state["python"].tolist()), state["python_gauss"])
    )
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss)
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Resumed:
    """What a checkpoint tells the loop besides the weights: where to go on from."""

    step: int  # optimizer steps completed
    samples: int  # samples seen over all ranks
    rng: list[dict[str, Any]]  # capture_rng() of each rank, by rank
    data: list[dict[str, Any]] | None = None  # each rank's data counts (SkipCounter.as_dict())


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    samples: int,
    rng: list[dict[str, Any]],
    data: list[dict[str, Any]] | None = None,
) -> None:
    """Write the full training state to `path` atomically (call on rank 0 only)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "samples": samples,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        "data": data,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    info = path.with_suffix(".json")
    tmp_info = info.with_name(info.name + ".tmp")
    tmp_info.write_text(json.dumps({"step": step, "samples": samples}))
    os.replace(tmp_info, info)


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> Resumed:
    """Load `path` into model, optimizer and scaler (in place); return where to resume."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message advises turning weights_only off, i.e. running the file's code: never relay it
        raise UserError(f"{path} is not a vla checkpoint (a pickle that would run code to load; vla "
                        f"does not load those); delete it to start the run over") from e
    except Exception as e:  # truncated file, not a torch file, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read checkpoint {path} ({first}); delete it to start the run over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a vla checkpoint; delete it to start the run over")
    if state["version"] != VERSION:
        raise StageError(
            f"checkpoint {path} has format version {state['version']}, this vla reads "
            f"{VERSION}; delete it to start over"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise StageError(
            f"checkpoint {path} does not fit this model/optimizer ({first}); "
            "use a fresh output directory or delete the checkpoint"
        ) from e
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return Resumed(step=int(state["step"]), samples=int(state["samples"]), rng=state["rng"],
                   data=state.get("data"))
