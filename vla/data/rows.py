"""Batches of row indices over a table of cached features, for stages that train on features
alone (ProCLIP's distill, DCLIP's meta-teacher)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def row_batches(n: int, batch_size: int, seed: int, start_step: int, world_size: int = 1,
                rank: int = 0, batches_per_epoch: int | None = None) -> Iterator[torch.Tensor]:
    """Global batches of row indices, reshuffled every epoch from (seed, epoch): step s always
    gets the same rows, which is what makes a resume exact. Rank r takes every world_size-th row.
    An epoch is n // batch_size steps (the last partial batch of an epoch is left out), or
    `batches_per_epoch` (at most that) where a caller needs epochs to end on a whole number of
    optimizer steps."""
    if not 1 <= batch_size <= n:
        from vla.errors import UserError

        raise UserError(f"train.batch_size {batch_size} is more than the {n} training rows; "
                        f"lower train.batch_size (e.g. --set train.batch_size={max(1, n)}) or add data")
    per_epoch = n // batch_size if batches_per_epoch is None else min(batches_per_epoch, n // batch_size)
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)
        yield perm[i * batch_size:(i + 1) * batch_size][rank::world_size]
        step += 1
