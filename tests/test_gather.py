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


def _sum_losses_worker(rank: int, init_file: str, out_dir: str, s: torch.Tensor, u: torch.Tensor,
                       logits: torch.Tensor, targets: torch.Tensor) -> None:
    from vla.losses import caption_loss, distill_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        mine = s.chunk(WORLD)[rank].clone().requires_grad_(True)
        out = distill_loss(mine, u.chunk(WORLD)[rank], rank=rank, world_size=WORLD)
        out["loss"].backward()
        lg = logits.chunk(WORLD)[rank].clone().requires_grad_(True)
        cap = caption_loss(lg, targets.chunk(WORLD)[rank], world_size=WORLD)
        cap.backward()
        torch.save({"ins": out["ins"].detach(), "struct": out["struct"].detach(), "grad": mine.grad,
                    "cap": cap.detach(), "cap_grad": lg.grad}, Path(out_dir) / f"sums{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_summed_and_token_mean_losses_cover_the_global_batch_on_two_ranks(tmp_path: Path) -> None:
    """ProCLIP's L_ins and L_struct (sums; pairs across ranks included) and MM-GEM's caption loss
    (a mean over every rank's tokens, ranks holding different numbers): the mean of the ranks' values
    is the single-process value on the whole batch, and each rank's gradient is world_size × the
    single-process one (what DDP's average turns into exactly that gradient)."""
    from vla.losses import caption_loss, distill_loss

    g = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 8, generator=g, dtype=torch.float64), dim=-1)
    u = F.normalize(torch.randn(WORLD * LOCAL_BATCH, 8, generator=g, dtype=torch.float64), dim=-1)
    logits = torch.randn(WORLD * LOCAL_BATCH, 5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(11, (WORLD * LOCAL_BATCH, 5), generator=g)
    targets[:LOCAL_BATCH, 3:] = -100  # rank 0 has fewer caption tokens than rank 1
    mp.spawn(_sum_losses_worker, args=(str(tmp_path / "init"), str(tmp_path), s, u, logits, targets), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"sums{r}.pt") for r in range(WORLD)]

    whole = s.clone().requires_grad_(True)
    out = distill_loss(whole, u)
    out["loss"].backward()
    lg = logits.clone().requires_grad_(True)
    cap = caption_loss(lg, targets)
    cap.backward()
    for key, want in (("ins", out["ins"]), ("struct", out["struct"]), ("cap", cap)):
        torch.testing.assert_close(sum(r[key] for r in ranks) / WORLD, want.detach(), msg=key)
    for rank, r in enumerate(ranks):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(r["grad"], WORLD * whole.grad[rows], msg=f"distill grad, rank {rank}")
        torch.testing.assert_close(r["cap_grad"], WORLD * lg.grad[rows], msg=f"caption grad, rank {rank}")
