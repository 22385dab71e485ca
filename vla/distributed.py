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


#: the oldest driver each CUDA major version runs on (NVIDIA's "minor version compatibility" table)
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
#: set to 1 to let `device: auto` train on the CPU where a GPU was expected (see `resolve_device`)
ALLOW_CPU_ENV = "VLA_ALLOW_CPU"


def gpu_hardware() -> str | None:
    """What says this machine has an NVIDIA GPU (a /dev/nvidia* device, `nvidia-smi` on PATH), or None."""
    import glob
    import shutil

    devices = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if devices:
        return devices[0]
    smi = shutil.which("nvidia-smi")
    return smi


def driver_version() -> str | None:
    """The NVIDIA driver's version, from `nvidia-smi` (or /proc/driver/nvidia/version); None if unknown."""
    import re
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        # the query's answer is the version alone; nvidia-smi's table says "Driver Version: X"
        m = re.search(r"Driver Version:\s*([0-9][0-9.]*)", out) or re.match(r"\s*([0-9]+\.[0-9.]+)\s", out + " ")
        if m:
            return m.group(1)
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+([0-9.]+)", f.read())
    except OSError:
        return None
    return m.group(1) if m else None


def unusable_gpu_message() -> str | None:
    """One line naming torch's CUDA build, the driver and the fix, where a GPU is present but this
    torch cannot use it; None where torch sees a GPU or there is none to see."""
    if torch.cuda.is_available() or gpu_hardware() is None:
        return None
    driver = driver_version()
    build = torch.version.cuda
    if build is None:
        return (f"an NVIDIA GPU is present ({gpu_hardware()}, driver {driver or 'unknown'}) but this torch "
                f"{torch.__version__} is a CPU-only build: install a CUDA build, pip install torch "
                "--index-url https://download.pytorch.org/whl/cuXYZ (docs/gpus.md)")
    major = int(build.split(".")[0])
    need = MIN_DRIVER.get(major)
    too_old = need is not None and driver is not None and int(driver.split(".")[0]) < need
    why = (f"CUDA {build} needs driver >= {need}" if too_old
           else "the driver does not answer (is the kernel module loaded, the device visible to this container?)"
           if driver is None else "CUDA did not initialise (check CUDA_VISIBLE_DEVICES and nvidia-smi)")
    return (f"an NVIDIA GPU is present (driver {driver or 'unknown'}) but torch {torch.__version__}, built for "
            f"CUDA {build}, cannot use it: {why}; install a torch build for a CUDA your driver runs, pip install "
            "torch --index-url https://download.pytorch.org/whl/cu12X (CUDA 12: driver >= 525), or update the "
            "driver (docs/gpus.md)")


def resolve_device(device: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """"auto" → this process' GPU when there is one, else CPU; "cuda" without a GPU is an error.

    "auto" refuses to fall back to the CPU where that cannot be what the user meant: on a machine
    with an NVIDIA GPU that torch cannot use (a driver older than torch's CUDA build needs), and
    under torchrun (world_size > 1), which launches a process per GPU. `device: cpu` in the recipe
    (`--set train.device=cpu`), or VLA_ALLOW_CPU=1, trains on the CPU on purpose."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(unusable_gpu_message()
                        or "device 'cuda' requested but no GPU is visible: use device=cpu or auto")
    if device == "auto" and not torch.cuda.is_available() and os.environ.get(ALLOW_CPU_ENV) != "1":
        unusable = unusable_gpu_message()
        if unusable:
            raise UserError(f"device 'auto' would train on the CPU: {unusable}; set train.device=cpu "
                            f"(or {ALLOW_CPU_ENV}=1) to train on the CPU on purpose")
        if world_size > 1:
            raise UserError(f"torchrun started {world_size} ranks but no GPU is visible, so device 'auto' "
                            f"would train every rank on the CPU; set train.device=cpu (or {ALLOW_CPU_ENV}=1) "
                            "to do that on purpose, or run where torch sees the GPUs (nvidia-smi; docs/gpus.md)")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU); idempotent."""
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    dev = resolve_device(device, local_rank, world_size)
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
