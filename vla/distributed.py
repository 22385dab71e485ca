"""Process-group set-up for `torchrun`, and the few collectives the stages need.

`torchrun --nproc-per-node N -m vla ...` sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `vla ...`
sets none and everything here degrades to a single process (no process group, no-op collectives).
Parallelism stays out of the models: the loop wraps the model in DDP, contrastive losses gather
features with gradients themselves.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vla.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, its rank on the node, the world size, its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" → this process' GPU when there is one, else CPU; "cuda" without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no GPU is visible: use device=cpu or auto")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU); idempotent."""
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        # Collectives (nccl, gather_object) use the "current" GPU: make it this rank's.
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_shutdown)
    return DistInfo(rank, local_rank, world_size, dev)


def _shutdown() -> None:
    # A process group left alive at exit makes torch warn, and nccl may hang on teardown.
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the only process that writes checkpoints, logs and artifacts."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over all ranks (a new tensor; `x` itself is left alone)."""
    if not dist.is_initialized():
        return x.clone()
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def gather_to_main(obj: object) -> list[object] | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere); `[obj]` in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: object) -> list[object]:
    """Every rank's `obj`, by rank, on every rank; `[obj]` in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: object) -> object:
    """Rank 0's `obj` on every rank (a synchronisation point); `obj` itself in a single process."""
    if not dist.is_initialized():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
