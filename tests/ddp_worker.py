"""A tiny regression trained by `vla.train`, alone or under `torchrun` (tests/test_ddp.py).

Every step's global batch is fixed by the step index; each rank trains on its contiguous share.
With a per-rank mean loss and DDP's gradient averaging, N ranks on B/N samples each must follow
the same trajectory as one process on B.

    python tests/ddp_worker.py WORKDIR                              # one process
    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py WORKDIR
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vla.distributed import init_distributed
from vla.errors import Interrupted
from vla.train import TrainConfig, train

GLOBAL_BATCH = 8
CFG = TrainConfig(steps=6, grad_accum=2, lr=1e-2, warmup_steps=2, checkpoint_every=3,
                  log_every=1, device="cpu", grad_clip=0.5)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))


def global_batch(micro_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(micro_index)
    return torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


def batches_for(rank: int, world_size: int):
    share = GLOBAL_BATCH // world_size

    def batches(start_step: int):
        for i in itertools.count(start_step * CFG.grad_accum):
            x, y = global_batch(i)
            yield x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]

    return batches


def step_fn(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch
    return {"loss": F.mse_loss(model(x), y)}


def main(workdir: Path, preemptible: bool = False) -> None:
    """`preemptible`: a run far too long to finish, a little slowed, logging every step, for a
    signal to stop (tests/test_ddp.py); each rank writes the message it stopped with to
    WORKDIR/stopped-rank<r>.txt."""
    info = init_distributed("cpu")
    cfg, batches = CFG, batches_for(info.rank, info.world_size)
    if preemptible:
        cfg = dataclasses.replace(CFG, steps=100_000, checkpoint_every=100_000)
        fast = batches

        def batches(start_step: int):
            for batch in fast(start_step):
                time.sleep(0.01)
                yield batch
    try:
        train(cfg, make_model(), step_fn, batches, workdir)
    except Interrupted as e:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / f"stopped-rank{info.rank}.txt").write_text(str(e))
        raise


if __name__ == "__main__":
    main(Path(sys.argv[1]), preemptible=sys.argv[2:] == ["preemptible"])
