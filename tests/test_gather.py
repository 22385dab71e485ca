"""ClipLoss across 2 real processes (gloo) equals ClipLoss in one process on the whole batch.

Scaling, which is the point of this test: with gather-with-grad, the all-gather's backward sums
every rank's gradient into the rank that owns the slice, so rank r's feature gradient is
∂(Σ_k L_k)/∂f_r. With the local loss L_k is the mean over rank k's rows, so the global loss is
mean_k L_k and that gradient is world_size × the single-process one — which DDP's average over
ranks turns back into exactly the single-process parameter gradient. Without gather-with-grad
each rank computes the full loss but gets only its own direct gradient (× 1), so DDP's average
leaves open_clip's known 1/world_size factor on the parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vla.losses import ClipLoss

WORLD = 2
LOCAL_BATCH = 3
# (local_loss, gather_with_grad) → factor between a rank's feature gradient and the single-process one
CONFIGS = {(True, True): WORLD, (False, True): WORLD, (False, False): 1}


def _worker(rank: int, init_file: str, out_dir: str, image: torch.Tensor, text: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for local_loss, gather_with_grad in CONFIGS:
            img = image.chunk(WORLD)[rank].clone().requires_grad_(True)
            txt = text.chunk(WORLD)[rank].clone().requires_grad_(True)
            scale = torch.tensor(4.0, requires_grad=True)
            loss_fn = ClipLoss(
                local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=WORLD
            )
            loss = loss_fn(img, txt, scale)
            loss.backward()
            results[(local_loss, gather_with_grad)] = (loss.detach(), img.grad, txt.grad, scale.grad)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 8, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 8, generator=generator, dtype=torch.float64), dim=-1)

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), image, text), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    img, txt = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    scale = torch.tensor(4.0, requires_grad=True)
    loss = ClipLoss()(img, txt, scale)
    loss.backward()
    assert img.grad is not None and txt.grad is not None and scale.grad is not None

    for config, factor in CONFIGS.items():
        per_rank = [results[config] for results in ranks]
        mean_loss = sum(r[0] for r in per_rank) / WORLD
        torch.testing.assert_close(mean_loss, loss.detach(), msg=f"loss, {config}")
        for rank, (_, img_grad, txt_grad, _) in enumerate(per_rank):
            rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
            torch.testing.assert_close(img_grad, factor * img.grad[rows], msg=f"image grad, {config}")
            torch.testing.assert_close(txt_grad, factor * txt.grad[rows], msg=f"text grad, {config}")
        # the scale is replicated: DDP averages its gradient over ranks
        mean_scale_grad = sum(r[3] for r in per_rank) / WORLD
        torch.testing.assert_close(mean_scale_grad, scale.grad, msg=f"scale grad, {config}")
