"""contrast-tune's pieces: the baseline's defaults, captions drawn anew each epoch (resume-exact),
and gradient checkpointing that reaches open_clip's image tower or refuses."""

from __future__ import annotations

import collections

import pytest
import torch
from PIL import Image

from vla.data.sample import Sample
from vla.data.shards import ShardWriter
from vla.data.stream import make_loader, resolve_data
from vla.errors import UserError
from vla.recipes import load_recipe
from vla.stages.contrast_tune import LONG, ContrastTuneRecipe, draw_caption


def test_init_random_alone_is_the_llm2clip_baseline():
    """λ defaults to 0 with --init random (before: 1, so `--init random` alone was not LLM2CLIP)."""
    assert load_recipe(ContrastTuneRecipe, None, ["init=random"]).reg_weight == 0.0
    assert load_recipe(ContrastTuneRecipe, None, []).reg_weight == 1.0          # from a distill artifact
    assert load_recipe(ContrastTuneRecipe, None, ["init=random", "reg_weight=0.5"]).reg_weight == 0.5


def _data(tmp_path, n=24):
    with ShardWriter(tmp_path, maxcount=8, image_format="png") as w:
        for i in range(n):
            w.write(Sample(f"s{i:02d}", Image.new("RGB", (4, 4)), [f"caption {j} of {i}" for j in range(5)],
                           long_caption=f"long caption of {i}" if i % 4 else None))
    return resolve_data(tmp_path)


def _draws(source, start_batch=0, n_batches=9, workers=0):
    def transform(sample):
        return {"key": sample.key, "caption_index": draw_caption(sample, 0.5)}

    loader = make_loader(source, transform, 8, num_workers=workers, seed=3, start_batch=start_batch,
                         repeat=True, shuffle_buffer=4)
    out = []
    for _, (batch, _) in zip(range(n_batches), loader):
        out += list(zip(batch["key"], batch["caption_index"].tolist()))
    return out


def test_captions_are_drawn_anew_each_epoch_and_a_resume_draws_the_same(tmp_path):
    """Before, a sample trained on one caption forever (fixed by its key)."""
    source = _data(tmp_path)
    draws = _draws(source)  # 9 batches of 8 = 3 epochs of 24
    by_key = collections.defaultdict(list)
    for key, index in draws:
        by_key[key].append(index)
    assert all(len(v) == 3 for v in by_key.values())
    assert sum(len(set(v)) > 1 for v in by_key.values()) >= 12  # most samples change caption
    longs = [i for _, i in draws if i == LONG]
    assert 0.25 < len(longs) / len(draws) < 0.6
    assert all(i != LONG for k, i in draws if int(k[1:]) % 4 == 0)  # no long caption: never drawn
    assert {i for _, i in draws} == {LONG, 0, 1, 2, 3, 4}
    # a resume after batch 4 draws exactly what the uninterrupted run drew; so do workers
    assert _draws(source, start_batch=4, n_batches=5) == draws[4 * 8:]
    assert _draws(source, workers=2) == draws


def _draws_by_key(source, epoch, rank=0, world_size=1, workers=0):
    """{key: caption index} of one rank's samples in `epoch`."""
    def transform(sample):
        return {"key": sample.key, "caption_index": draw_caption(sample, 0.5)}

    out = {}
    for batch, _ in make_loader(source, transform, 4, num_workers=workers, rank=rank, world_size=world_size,
                                seed=3, epoch=epoch, shuffle_buffer=4, drop_last=False):
        out.update(zip(batch["key"], batch["caption_index"].tolist()))
    return out


def test_a_samples_caption_draw_depends_on_seed_epoch_and_key_not_on_ranks_or_workers(tmp_path):
    """Before, the stream seeded a sample's draws by (seed, epoch, rank, position): 2 GPUs drew
    other captions than 1 for the same sample and epoch."""
    from vla.data.stream import sample_seed

    source = _data(tmp_path)  # three shards: two ranks hold different shards at other positions
    for epoch in (0, 1):
        one = _draws_by_key(source, epoch)
        two = {**_draws_by_key(source, epoch, 0, 2), **_draws_by_key(source, epoch, 1, 2, workers=2)}
        assert len(one) == 24 and two == one
        assert _draws_by_key(source, epoch, workers=2) == one
    assert _draws_by_key(source, 0) != _draws_by_key(source, 1)  # new each epoch
    # a stable hash: the same in every process (Python's hash() of a str is salted per process)
    assert sample_seed(3, 1, "s01") == 0x6DF671381E0B3377
    assert len({sample_seed(3, 1, "s01"), sample_seed(3, 2, "s01"), sample_seed(4, 1, "s01"),
                sample_seed(3, 1, "s02")}) == 4


def _micro_visual():
    from vla.models.clip import load_clip

    torch.manual_seed(0)
    return load_clip("vla-micro-clip").model.visual


def test_grad_checkpointing_request_reaches_open_clips_tower(monkeypatch, tmp_path):
    """Before, ImageTextAligner had no set_grad_checkpointing and the loop only logged a warning."""
    import open_clip.transformer

    from vla.losses import LogitScale
    from vla.models.proclip.adapter import Adapter, AdapterConfig
    from vla.models.proclip.ema import make_ema_teacher
    from vla.models.proclip import ImageTextAligner
    from vla.train import TrainConfig, train

    visual = _micro_visual()
    model = ImageTextAligner(visual, Adapter.from_config(AdapterConfig.llm2clip(16, 32)), LogitScale(),
                             make_ema_teacher(visual))
    calls = []
    real = open_clip.transformer.checkpoint
    monkeypatch.setattr(open_clip.transformer, "checkpoint",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def step(m, batch):
        img, txt, scale, _ = m(batch["image"], batch["phi"])
        return {"loss": -(scale * img @ txt.T).diagonal().mean()}

    def batches(_start):
        while True:
            yield {"image": torch.randn(4, 3, 32, 32), "phi": torch.randn(4, 16)}

    cfg = TrainConfig(steps=1, warmup_steps=0, grad_checkpointing=True, device="cpu")
    model.train()
    train(cfg, model, step, batches, tmp_path)
    assert visual.transformer.grad_checkpointing
    assert not model.teacher.transformer.grad_checkpointing  # no grad there, nothing to save
    assert len(calls) == len(visual.transformer.resblocks)  # every block of the trained tower, once


def test_grad_checkpointing_that_cannot_be_honoured_is_an_error():
    from open_clip.modified_resnet import ModifiedResNet
    from torch import nn

    from vla.losses import LogitScale
    from vla.models.proclip.adapter import Adapter, AdapterConfig
    from vla.models.proclip import ImageTextAligner
    from vla.train import TrainConfig, train

    resnet = ModifiedResNet(layers=[1, 1, 1, 1], output_dim=8, heads=1, image_size=32, width=8)
    aligner = ImageTextAligner(resnet, Adapter.from_config(AdapterConfig.llm2clip(16, 8)), LogitScale())
    with pytest.raises(UserError, match="ModifiedResNet.*cannot checkpoint.*grad_checkpointing=false"):
        aligner.set_grad_checkpointing(True)
    cfg = TrainConfig(steps=1, grad_checkpointing=True, device="cpu")
    with pytest.raises(UserError, match="Linear cannot checkpoint"):
        train(cfg, nn.Linear(2, 2), lambda m, b: {"loss": m(b).sum()}, lambda s: iter([]), "/nonexistent")
