"""The one training loop every stage uses.

A stage hands `train` its model, a `step_fn` (model, batch) → {"loss": …, other scalars}, and a
deterministic `batches(start_step)`; the loop does the rest: AdamW with open_clip's weight-decay
split, warmup + cosine lr, fp32 / bf16 / fp16 (with GradScaler), gradient accumulation, clipping,
gradient checkpointing, torch.compile, DDP under torchrun, self-attention without layout copies
(`vla.models.attention`), NaN stops, samples/s, metrics.jsonl,
TensorBoard, a progress bar, and checkpoints from which a rerun resumes bit-for-bit.
Ctrl-C or SIGTERM (a scheduler preempting the job) ends the current step, saves a checkpoint and
raises `Interrupted`, whose message says the step a rerun resumes from.

Conventions:
- Steps are optimizer steps. `batches(s)` yields the micro-batches of steps s, s+1, … (grad_accum
  per step), where s is the number of steps already done; under torchrun each rank yields its own
  share. Batches are moved to the device (tensors inside dicts/lists/tuples; the rest untouched).
- `step_fn` gets the wrapped model (DDP and/or compiled) and must call its forward, which is how
  DDP knows to synchronise gradients. The loss is the mean over the rank's micro-batch; DDP averages
  gradients over ranks, so equal shares make that the mean over the global batch.
- Train/eval modes are the caller's: the loop never calls `model.train()`, so a frozen teacher
  inside the model stays in eval. Anything `after_step` updates must live in the model (a
  parameter or buffer) to be checkpointed.
- Only rank 0 writes (checkpoints, metrics.jsonl, TensorBoard, the progress bar).
- The data's skip counts (`skips`, each rank's own) travel in the checkpoints, so a resumed run
  reports what an uninterrupted one would, and `skip_limit` is checked on the counts of all ranks
  before each checkpoint is written: a run over the limit never saves a checkpoint that a rerun
  would take as done.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vla import optim
from vla.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from vla.data.skips import SkipCounter, SkipLimit
from vla.distributed import all_gather, all_reduce_mean, barrier, gather_to_main, init_distributed
from vla.errors import Interrupted, StageError, UserError
from vla.models.attention import fast_self_attention
from vla.models.onednn_linear import BACKENDS as CPU_MATMULS, onednn_linear, use_onednn
from vla.reporter import Clock, Reporter

log = logging.getLogger(__name__)

FINAL_WINDOW = 20  # TrainResult.metrics average the last this-many steps
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes


@dataclass
class TrainConfig:
    """Hyperparameters of the training loop (the `train:` block of every stage's recipe)."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # per process, per micro-step (read by the stage's batch function)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.1  # AdamW decay; never on norms, biases, logit scales (open_clip's rule)
    optimizer: str = "adamw"  # "adamw" | "lamb" (timm's LAMB)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100  # linear warmup from lr/warmup_steps to lr
    schedule: str = "cosine"  # "cosine" (to min_lr at the last step) | "constant"
    min_lr: float = 0.0
    grad_clip: float | None = 1.0  # max global grad norm; None = off
    precision: str = "fp32"  # "fp32" | "bf16" (autocast) | "fp16" (autocast + GradScaler)
    grad_checkpointing: bool = False  # via model.set_grad_checkpointing(True); an error when it has none
    compile: bool = False  # torch.compile the (wrapped) model
    # fp32 linears on the CPU: "auto" = oneDNN's matmul where torch has it, "blas" = torch's
    # default (MKL); the same product within float rounding (vla.models.onednn_linear)
    cpu_matmul: str = "auto"
    checkpoint_every: int = 200  # steps between checkpoints (and one at the end)
    log_every: int = 10  # steps between metrics.jsonl records
    seed: int = 0  # each rank seeds with seed + rank
    tensorboard: bool = False  # also write workdir/tensorboard/
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives lists
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr": 0 <= self.min_lr <= self.lr,
            "grad_clip": self.grad_clip is None or self.grad_clip > 0,
            "checkpoint_every": self.checkpoint_every >= 1,
            "log_every": self.log_every >= 1,
            "schedule": self.schedule in ("cosine", "constant"),
            "precision": self.precision in PRECISIONS,
            "optimizer": self.optimizer in ("adamw", "lamb"),
            "device": self.device in ("auto", "cpu", "cuda"),
            "cpu_matmul": self.cpu_matmul in CPU_MATMULS,
        }
        bad = [k for k, ok in checks.items() if not ok]
        allowed = {"schedule": "cosine, constant", "precision": ", ".join(PRECISIONS), "device": "auto, cpu, cuda",
                   "cpu_matmul": ", ".join(CPU_MATMULS)}
        if bad:
            hint = f"; one of {allowed[bad[0]]}" if bad[0] in allowed else ""
            raise UserError(f"train.{bad[0]} has an invalid value: {getattr(self, bad[0])!r}{hint}")


@dataclass
class TrainResult:
    """What a `train` call did; numbers for the artifact's manifest."""

    steps: int  # optimizer steps done in total (those before a resume included)
    samples: int  # samples seen over all ranks, in total
    wall_s: float  # this call's wall time
    samples_per_s: float  # this call's throughput, its first step (warm-up, compile) excluded
    metrics: dict[str, float] = field(default_factory=dict)  # means over the last steps
    resumed_from: int | None = None  # the checkpoint step this call resumed from
    data: dict[str, Any] | None = None  # the skip counts of all ranks, summed (with `skips`)


def train(
    cfg: TrainConfig,
    model: nn.Module,
    step_fn: Callable[[nn.Module, Any], dict[str, torch.Tensor]],
    batches: Callable[[int], Iterable[Any]],
    workdir: Path,
    *,
    after_step: Callable[[nn.Module, int], None] | None = None,
    param_groups: Callable[[nn.Module], list[dict]] | None = None,
    samples_per_batch: Callable[[Any], int] | None = None,
    stop_at_step: int | None = None,
    skips: SkipCounter | None = None,
    skip_limit: SkipLimit | None = None,
) -> TrainResult:
    """Train `model` for `cfg.steps` optimizer steps, resuming from workdir/checkpoints/last.pt.

    after_step(model, step): runs after each optimizer step on the unwrapped model (EMA updates).
    param_groups(model): optimizer groups instead of the decay/no-decay split; a group may set
        `weight_decay` and `lr_scale`.
    samples_per_batch(batch): samples a micro-batch stands for over all ranks; default: its leading
        dimension times the world size.
    stop_at_step: return after this many steps, without a final checkpoint, as a crash would.
    skips: the counter `batches` adds its skip counts to (see the module docstring).
    skip_limit: checked on all ranks' `skips` before each checkpoint (the final one: every sample).
    """
    wall_start = time.perf_counter()
    info = init_distributed(cfg.device)
    workdir = Path(workdir)
    ckpt_path = workdir / "checkpoints" / "last.pt"
    _seed_everything(cfg.seed + info.rank)
    if info.device.type == "cuda":
        # As open_clip: TF32 matmuls are ~free accuracy-wise for training and much faster.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model.to(info.device)
    # the same attention from the same weights, without nn.MultiheadAttention's layout copies
    fast_self_attention(model)
    if use_onednn(cfg.cpu_matmul, info.device):
        # fp32 linears through oneDNN's matmul: the same product, ~2x MKL's rate on AVX-512 AMD
        onednn_linear(model)
    if cfg.grad_checkpointing:  # a setting that cannot be honoured is an error, never a warning
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError(f"train.grad_checkpointing: {type(model).__name__} cannot checkpoint "
                            "activations; set train.grad_checkpointing=false")
        model.set_grad_checkpointing(True)
    groups = param_groups(model) if param_groups else optim.param_groups(model, cfg.weight_decay)
    optimizer = optim.build_optimizer(
        groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
        name=cfg.optimizer,
    )
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    resumed = None
    if ckpt_path.exists():
        resumed = load_checkpoint(ckpt_path, model=model, optimizer=optimizer, scaler=scaler)
    start = resumed.step if resumed else 0
    samples = resumed.samples if resumed else 0
    last_saved = start if resumed else None
    if skips is not None and resumed and resumed.data is not None:
        skips.restore(resumed.data, info.rank, info.world_size)
    if resumed and info.is_main:
        # say it: a rerun that silently starts at step 10 looks like a run that lost its start
        done = "; training is done, finishing the stage" if start >= cfg.steps else ""
        print(f"resuming from step {start} of {cfg.steps} ({ckpt_path}){done}", file=sys.stderr, flush=True)

    ddp = None
    if info.world_size > 1:
        ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    wrapped = ddp or model
    if cfg.compile:
        wrapped = torch.compile(wrapped)  # after DDP, so compiled graphs break at its buckets

    if resumed:
        if len(resumed.rng) == info.world_size:
            restore_rng(resumed.rng[info.rank])
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: data order is "
                        "exact, random draws (dropout) are not", len(resumed.rng), info.world_size)
        log.info("resuming from step %d (%s)", start, ckpt_path)

    end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
    autocast = torch.autocast(info.device.type, dtype=PRECISIONS[cfg.precision],
                              enabled=cfg.precision != "fp32")
    count = samples_per_batch or (lambda b: _batch_len(b) * info.world_size)
    clock = Clock()
    reporter = Reporter(cfg, workdir, start, clock, enabled=info.is_main)
    recent: deque[dict[str, float]] = deque(maxlen=FINAL_WINDOW)
    data = iter(batches(start))
    optimizer.zero_grad(set_to_none=True)

    def save(at: int, rng: dict, counts: dict | None, samples_at: int) -> None:
        """Checkpoint step `at` (a collective: every rank calls it), once the skip limit holds."""
        by_rank = all_gather(counts) if skips is not None else None
        if by_rank is not None and skip_limit is not None:
            skip_limit.check(SkipCounter.total(by_rank), final=at == cfg.steps)
        rngs = gather_to_main(rng)
        if info.is_main:
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scaler=scaler,
                            step=at, samples=samples_at, rng=rngs, data=by_rank)

    signals = _StopSignals(announce=info.is_main)
    try:
        signals.install()
        for step in range(start + 1, end + 1):  # 1-based: `step` is the step being computed
            # The state after the last step, should a signal cut this one short (see below).
            before = (capture_rng(), skips.as_dict() if skips else None, samples) if info.world_size == 1 else None
            lr = optim.lr_at(step - 1, lr=cfg.lr, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             schedule=cfg.schedule, min_lr=cfg.min_lr)
            optim.set_lr(optimizer, lr)
            keys, totals = None, None
            for micro in range(cfg.grad_accum):
                try:
                    batch = to_device(next(data), info.device)
                except StopIteration:
                    raise StageError(f"the data ran out at step {step} of {cfg.steps}; "
                                     "lower train.steps or make the data repeat") from None
                except Exception:
                    # The signal that stopped us may have ended the DataLoader workers too, and so
                    # this step: the model is still as the last step left it; save that.
                    if signals.signum is None:
                        raise
                    done = step - 1
                    if before is not None and done > 0 and done != last_saved:
                        save(done, *before)
                        last_saved = done
                    raise signals.interrupted(done, cfg.steps, last_saved) from None
                samples += count(batch)
                # Gradients are all-reduced only on the last micro-step of a step.
                sync = ddp is None or micro == cfg.grad_accum - 1
                with nullcontext() if sync else ddp.no_sync():
                    with autocast:
                        out = step_fn(wrapped, batch)
                    scaler.scale(out["loss"] / cfg.grad_accum).backward()
                keys = keys or ["loss"] + sorted(k for k in out if k != "loss")
                values = torch.stack([torch.as_tensor(out[k]).detach().float().to(info.device)
                                      for k in keys])
                totals = values if totals is None else totals + values
            # One collective and one host sync per step: the global means, for logs and NaN checks,
            # and whether any rank was asked to stop (so that all stop after the same step).
            asked = torch.tensor([float(signals.signum is not None)], device=info.device)
            means = all_reduce_mean(torch.cat([totals / cfg.grad_accum, asked])).tolist()
            stats, stop = dict(zip(keys, means[:-1])), means[-1] > 0
            if not math.isfinite(stats["loss"]):
                kept = (f"last good checkpoint (step {last_saved}) kept in {ckpt_path}"
                        if last_saved is not None else "no checkpoint had been written yet")
                raise StageError(f"loss became {stats['loss']} at step {step}; stopped, {kept}; "
                                 "try a lower lr, fp32, or grad_clip")

            grad_norm = None
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                # foreach: the per-tensor norms and the rescale as a few batched kernels
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip,
                                                           foreach=info.device.type in ("cpu", "cuda"))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step(model, step)

            clock.tick(samples)
            recent.append(stats)
            reporter.step(step, stats, lr, samples, grad_norm)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop:
                save(step, capture_rng(), skips.as_dict() if skips else None, samples)
                last_saved = step
            if stop:
                raise signals.interrupted(step, cfg.steps, last_saved)
    finally:
        signals.restore()
        reporter.close()
    barrier()
    total = SkipCounter.total(all_gather(skips.as_dict())).as_dict() if skips is not None else None

    wall = time.perf_counter() - wall_start
    sps = clock.overall(samples)
    if sps is None:  # a single step this call: nothing to exclude it from
        sps = (samples - (resumed.samples if resumed else 0)) / wall
    return TrainResult(
        steps=max(end, start),
        samples=samples,
        wall_s=wall,
        samples_per_s=sps,
        metrics={k: float(np.mean([r[k] for r in recent])) for k in (recent[0] if recent else {})},
        resumed_from=resumed.step if resumed else None,
        data=total,
    )


class _StopSignals:
    """SIGINT and SIGTERM during training: the loop finishes its step, saves a checkpoint and
    raises `Interrupted`. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self, *, announce: bool) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; its own handlers stay
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.signum = signum
        if hasattr(signal, "SIGCHLD") and signal.SIGCHLD not in self._previous:
            # DataLoader workers may die of the same SIGTERM, and torch's SIGCHLD handler would then
            # raise from whatever line of the step runs (optimizer.step() included). Without it the
            # loop notices dead workers when it next asks for data, between steps' states.
            self._previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint"
                  + (" (Ctrl-C again stops at once, losing the steps since the last checkpoint)"
                     if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def interrupted(self, step: int, steps: int, saved: int | None) -> Interrupted:
        signum = self.signum or signal.SIGTERM  # another rank's signal stopped this one
        name = signal.Signals(signum).name
        if saved == step and step > 0:
            rerun = f"checkpoint saved: rerun the same command to resume from step {step}"
        elif saved:
            rerun = f"rerun the same command to resume from step {saved}, the last checkpoint"
        else:
            rerun = "no checkpoint was saved: rerunning the same command starts from step 0"
        return Interrupted(f"stopped by {name} at step {step} of {steps}; {rerun}", signum)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every GPU


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _batch_len(batch: Any) -> int:
    """The leading dimension of the first tensor in `batch` (else its length)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        return _batch_len(batch[0])
    return len(batch)

