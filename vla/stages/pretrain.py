"""`vla pretrain`: train or fine-tune a CLIP with symmetric InfoNCE on image–text pairs.

Story: the data (a synth artifact or shards) → a CLIP from the registry (the embedded default's
small CLIP, any open_clip model, or a previous artifact) → ClipLoss (local loss + gather-with-grad
under torchrun) → the shared training loop → the model in open_clip's `local-dir` layout, scored
on the eval sets, in the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from vla.artifacts import Artifact, ArtifactBuilder, claim_out
from vla.stages.common import (DataConfig, EvalConfig, draft_size, evaluate_into, image_text_batches, train_on_pairs,
                               training_data)
from vla.train import TrainConfig

KIND = "pretrain"


@dataclass
class PretrainRecipe:
    model: str = "vla-tiny-clip"    # a registry name, open_clip `name:pretrained`, or a pretrain artifact
    lock_image: bool = False        # freeze the image tower
    lock_text: bool = False         # freeze the text tower
    local_loss: bool = True         # open_clip's local loss: local rows × all columns
    gather_with_grad: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_start_model(name: str):
    """A registry name, or a previous pretrain/contrast artifact's CLIP to continue from."""
    from vla.artifacts import open_artifact
    from vla.models.clip import load_clip

    if (Path(name) / "manifest.json").exists():
        art = open_artifact(name, KIND, role="--model")
        return load_clip("local-dir:" + str(art.path / "model")), {"init": art}
    return load_clip(name), {}


def clip_batch_transform(clip, preprocess: str = "open_clip"):
    """Sample → tensors: the training transform of the image, and one of the sample's captions
    drawn anew each time it is read. Both draw from torch's generator, which the data stream
    seeds per sample by (seed, epoch, sample key): the same draws with any number of GPUs or
    DataLoader workers and after a resume, new draws every epoch. The image stays uint8 (4× fewer
    bytes through the workers' shared memory); the tower normalises it on the device
    (`ClipModel.normalize_uint8_inputs`)."""
    image_transform = clip.uint8_train_preprocess(preprocess)

    def transform(sample) -> dict:
        image = image_transform(sample.image)
        caption = sample.captions[int(torch.randint(len(sample.captions), ()))]
        return {"image": image, "text": clip.tokenizer([caption])[0], "key": sample.key}

    return transform


def clip_features(model, batch):
    """Run the (possibly DDP-wrapped) open_clip model's forward: normalised features and scale."""
    out = model(batch["image"], batch["text"])
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def run(cfg: PretrainRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.data.stream import resolve_data
    from vla.data.skips import SkipCounter
    from vla.distributed import init_distributed
    from vla.losses import ClipLoss
    from vla.models.clip import save_clip

    claim_out(out, force=force, inputs={"data": data, "model": cfg.model})
    td = training_data(data)
    torch.manual_seed(cfg.train.seed)  # a random init (the small configs) is part of the recipe
    clip, init = load_start_model(cfg.model)
    dist = init_distributed(cfg.train.device)
    source = resolve_data(td.path)
    model = clip.model
    clip.normalize_uint8_inputs()  # the batches' uint8 images are normalised on the device
    for name, p in model.named_parameters():
        tower_locked = (cfg.lock_image and name.startswith("visual.")) or (
            cfg.lock_text and not name.startswith("visual.") and name != "logit_scale")
        p.requires_grad_(not tower_locked)

    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       rank=dist.rank, world_size=dist.world_size)
    skips = SkipCounter()

    batches = image_text_batches(source, clip_batch_transform(clip, cfg.data.train_preprocess), cfg.train, cfg.data,
                                 dist, skips, str(td.path), draft_size=draft_size(clip, cfg.data))

    def step(m, batch):
        img, txt, scale = clip_features(m, batch)
        return {"loss": loss_fn(img, txt, scale), "logit_scale": scale.detach()}

    def clamp_scale(m, _step):
        # open_clip clamps after each optimizer step, so the temperature never goes below 0.01
        with torch.no_grad():
            m.logit_scale.clamp_(0, math.log(100))

    with ArtifactBuilder(out, KIND, recipe=cfg, inputs={**td.inputs, **init}, force=force,
                         command=command) as art:
        train_on_pairs(art, cfg, model, step, batches, dist, skips, str(td.path), after_step=clamp_scale)
        if dist.rank == 0:
            model.eval()
            save_clip(clip, art.dir / "model")
            evaluate_into(art, clip, td.eval_dir, cfg.eval)
    return art.artifact
