"""The training loop: exact resume, NaN stops, weight-decay groups, the lr schedule, precisions,
and what it writes (checkpoints, metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vla.errors import StageError, UserError
from vla.optim import build_optimizer, lr_at, param_groups
from vla.train import TrainConfig, train

BATCH = 4


class Tiny(nn.Module):
    """Linear → LayerNorm → dropout → linear, a learned temperature, and an EMA buffer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.3)  # on: the resume must restore the RNG to be exact
        self.fc2 = nn.Linear(16, 4)
        self.logit_scale = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("ema", torch.zeros(4, 16))
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.ln(self.fc1(x)))) * self.logit_scale.exp()


def batches(start_step: int, grad_accum: int = 2):
    """Micro-batch j of step i depends only on (i, j): deterministic, so resumes see the same data."""
    for i in itertools.count(start_step):
        for j in range(grad_accum):
            g = torch.Generator().manual_seed(100 * i + j)
            yield {"x": torch.randn(BATCH, 8, generator=g), "y": torch.randn(BATCH, 4, generator=g),
                   "step": i}


def step_fn(model, batch):
    pred = model(batch["x"])
    return {"loss": F.mse_loss(pred, batch["y"]), "scale": model.logit_scale.exp()}


def ema_update(model, step):
    with torch.no_grad():
        model.ema.lerp_(model.fc2.weight, 0.5)


def cfg(**kw) -> TrainConfig:
    base = dict(steps=8, grad_accum=2, lr=1e-2, warmup_steps=2, checkpoint_every=2, log_every=1,
                device="cpu", weight_decay=0.1)
    return TrainConfig(**{**base, **kw})


def records(workdir) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_NO_PROGRESS", "1")
    full = Tiny()
    train(cfg(), full, step_fn, batches, tmp_path / "full", after_step=ema_update)

    part = tmp_path / "part"
    first = train(cfg(), Tiny(), step_fn, batches, part, after_step=ema_update, stop_at_step=3)
    assert first.steps == 3 and first.resumed_from is None
    # The "crash" came after step 3 but the last checkpoint is step 2: the rerun redoes step 3.
    assert torch.load(part / "checkpoints/last.pt", weights_only=True)["step"] == 2

    resumed = Tiny(seed=123)  # different init: everything must come from the checkpoint
    result = train(cfg(), resumed, step_fn, batches, part, after_step=ema_update)
    assert result.resumed_from == 2 and result.steps == 8
    assert result.samples == 8 * 2 * BATCH

    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, tensor in full_state.items():
        assert torch.equal(tensor, resumed_state[name]), name
    assert full.ema.abs().sum() > 0  # after_step ran and its state was checkpointed
    # metrics.jsonl: the redone step 3 is logged once, and every loss matches bit for bit.
    full_recs, part_recs = records(tmp_path / "full"), records(part)
    assert [r["step"] for r in part_recs] == list(range(1, 9))
    assert [r["loss"] for r in part_recs] == [r["loss"] for r in full_recs]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_NO_PROGRESS", "1")

    def poisoned(model, batch):
        out = step_fn(model, batch)
        if batch["step"] == 5:  # the 0-based index of step 6
            out["loss"] = out["loss"] * float("nan")
        return out

    model = Tiny()
    ckpt = tmp_path / "checkpoints/last.pt"
    with pytest.raises(StageError, match=r"loss became nan at step 6; stopped, last good "
                                          r"checkpoint \(step 4\) kept in .*last\.pt; try a lower"):
        train(cfg(), model, poisoned, batches, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step was not applied
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 5]


def test_weight_decay_groups_follow_open_clip():
    model = Tiny()
    model.fc1.weight.requires_grad_(False)  # frozen: in no group at all
    no_decay, decay = param_groups(model, weight_decay=0.2)
    by_id = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.2
    assert sorted(by_id[id(p)] for p in no_decay["params"]) == [
        "fc1.bias", "fc2.bias", "ln.bias", "ln.weight", "logit_scale"]
    assert [by_id[id(p)] for p in decay["params"]] == ["fc2.weight"]

    opt = build_optimizer([no_decay, decay], lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    assert [g["lr_scale"] for g in opt.param_groups] == [1.0, 1.0]
    model.requires_grad_(False)
    with pytest.raises(UserError, match="nothing to train"):
        build_optimizer(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                        weight_decay=0.1)


def test_lr_schedule_by_hand():
    kw = dict(lr=1.0, steps=10, warmup_steps=2)
    assert lr_at(0, **kw) == 0.5 and lr_at(1, **kw) == 1.0  # linear warmup, (step+1)/W
    assert lr_at(2, **kw) == 1.0  # cosine starts at the peak
    assert lr_at(6, **kw) == pytest.approx(0.5)  # halfway through the 8 cosine steps
    assert lr_at(9, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_at(6, **kw, min_lr=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(7, **kw, schedule="constant") == 1.0
    assert lr_at(0, lr=1.0, steps=10, warmup_steps=0) == 1.0


def test_metrics_jsonl_tensorboard_and_result(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_NO_PROGRESS", "1")
    model = Tiny()
    c = cfg(steps=5, log_every=2, checkpoint_every=100, tensorboard=True, grad_checkpointing=True)
    result = train(c, model, step_fn, batches, tmp_path)

    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [2, 4, 5]  # every log_every steps, and the last
    for r in recs:
        assert set(r) == {"step", "loss", "scale", "lr", "samples", "samples_per_s", "grad_norm"}
        assert r["samples"] == r["step"] * 2 * BATCH
        assert r["samples_per_s"] > 0 and r["loss"] > 0 and r["grad_norm"] > 0
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, lr=1e-2, steps=5, warmup_steps=2))
    assert model.grad_checkpointing  # the loop asked the model for it
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # checkpoint_every > steps: still one at the end.
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["step"] == 5
    assert result.steps == 5 and result.samples == 5 * 2 * BATCH and result.samples_per_s > 0
    assert set(result.metrics) == {"loss", "scale"} and result.resumed_from is None
    # A rerun finds the finished checkpoint and does nothing more.
    again = train(c, Tiny(), step_fn, batches, tmp_path)
    assert again.resumed_from == 5 and again.steps == 5 and again.samples == result.samples


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_cpu(tmp_path, monkeypatch, precision):
    monkeypatch.setenv("VLA_NO_PROGRESS", "1")
    try:
        with torch.autocast("cpu", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision]):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except RuntimeError as e:  # older torch: no half-precision autocast on CPU
        pytest.skip(f"this torch has no {precision} autocast on CPU: {e}")
    model = Tiny()
    before = model.fc1.weight.detach().clone()
    result = train(cfg(steps=4, precision=precision), model, step_fn, batches, tmp_path)
    assert math.isfinite(result.metrics["loss"])
    assert not torch.equal(model.fc1.weight, before)  # steps were taken (not all skipped)
    assert model.fc1.weight.dtype == torch.float32  # autocast: master weights stay fp32
    scaler = torch.load(tmp_path / "checkpoints/last.pt", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (precision == "fp16")  # GradScaler only for fp16


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="train.precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(UserError, match="train.grad_accum"):
        TrainConfig(grad_accum=0)


def test_fused_adamw_and_foreach_clipping_match_the_per_tensor_loop(tmp_path, monkeypatch):
    """The loop's optimizer (AdamW as one fused kernel, on the CPU too) and its foreach gradient
    clipping make the same update as open_clip's per-tensor AdamW and clipping: a few steps of
    `train` end at the parameters of a hand-written loop with those, within float rounding."""
    monkeypatch.setenv("VLA_NO_PROGRESS", "1")
    model = Tiny()
    opt = build_optimizer(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    assert opt.defaults["fused"] is True

    c = cfg(steps=5, grad_accum=1, grad_clip=0.05, checkpoint_every=100)
    train(c, model, step_fn, lambda s: batches(s, grad_accum=1), tmp_path / "run")

    ref = Tiny()
    groups = param_groups(ref, 0.1)
    ref_opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1,
                                foreach=False, fused=False)
    torch.manual_seed(c.seed)  # the loop seeds before its first step (dropout draws)
    data = batches(0, grad_accum=1)
    for step in range(c.steps):
        for g in ref_opt.param_groups:
            g["lr"] = lr_at(step, lr=c.lr, steps=c.steps, warmup_steps=c.warmup_steps)
        step_fn(ref, next(data))["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), c.grad_clip, foreach=False)
        assert norm > c.grad_clip  # the clipping is exercised
        ref_opt.step()
        ref_opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
