"""`vla contrast-tune`: ProCLIP stage 2 — contrastive tuning with self-distillation regularisation;
with `--init random` the same command is the LLM2CLIP baseline.

Story (METHODS.md §1): image–text pairs → the CLIP image tower E_I (trained), the frozen
embedder Φ (cached features only) and the adapter g (from `vla distill`, or random) →

    L = L_info + λ · L_reg
    L_info = ½[CE(s·I Tᵀ) + CE(s·T Iᵀ)]           (learnable s, clamped at 100; local loss +
                                                    gather-with-grad under torchrun)
    L_reg  = ‖E_I(x) − E_I^t(x)‖² + smoothL1(pdist(E_I(x)), pdist(E_I^t(x)))
    E_I^t  ← m·E_I^t + (1−m)·E_I after every step    (m = 1.0: the frozen copy of the public code)

→ the tuned image tower in open_clip's layout, the adapter, the embedder named, eval metrics.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from vla.artifacts import Artifact, ArtifactBuilder, open_artifact
from vla.errors import UserError
from vla.stages.common import EvalConfig, evaluate_into, image_text_batches, train_on_pairs, training_data
from vla.stages.distill import EmbedderConfig, model_identity
from vla.stages.pretrain import DataConfig
from vla.train import TrainConfig

KIND = "contrast-tune"


@dataclass
class ContrastTuneRecipe:
    init: str = "distill"                   # a distill artifact's path, or "random" (LLM2CLIP baseline)
    clip: Optional[str] = None              # the CLIP whose image tower is tuned; default: distill's teacher
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)  # used with init=random
    adapter: Literal["proclip", "llm2clip"] = "llm2clip"  # adapter shape when init=random
    reg_weight: float = 1.0                 # λ; 0 turns L_reg off (the LLM2CLIP baseline)
    ema_momentum: float = 1.0               # teacher image encoder: 1.0 = frozen copy, <1 = EMA
    long_caption_prob: float = 0.5          # share of samples that train on their long caption
    local_loss: bool = True
    gather_with_grad: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name, value in (("long_caption_prob", self.long_caption_prob), ("ema_momentum", self.ema_momentum)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be between 0 and 1, not {value}")
        if self.reg_weight < 0:
            raise UserError(f"reg_weight must be 0 or more, not {self.reg_weight}")


def _trains_on_long(seed: int, key: str, prob: float) -> bool:
    """Whether sample `key` trains on its long caption: fixed by (seed, key), so every epoch, every
    DataLoader worker and a resumed run make the same choice, and the cache holds just those."""
    return random.Random(f"{seed}:{key}").random() < prob


def _starting_point(cfg: ContrastTuneRecipe):
    """(clip name, embedder, adapter, inputs) from the distill artifact or, for init=random, the recipe."""
    from vla.models.embedder import load_embedder
    from vla.models.proclip import embedder_from_spec, load_adapter

    if cfg.init == "random":
        if not cfg.clip:
            raise UserError("contrast-tune --init random needs the CLIP to tune: pass --clip (e.g. --clip clip-vit-l)")
        e = cfg.embedder
        embedder = load_embedder(e.name, pooling=e.pooling, instruction=e.instruction, max_length=e.max_length)
        return cfg.clip, embedder, None, {}
    art = open_artifact(cfg.init, "distill", role="--init")
    clip_ref = cfg.clip or json.loads((art.path / "teacher.json").read_text())["teacher"]
    adapter = load_adapter(art.path).train()
    return clip_ref, embedder_from_spec(art.path), adapter, {"init": art}


def run(cfg: ContrastTuneRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.cache import cached_features
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.distributed import init_distributed
    from vla.losses import ClipLoss, LogitScale, self_distillation_loss
    from vla.models.adapter import Adapter, AdapterConfig
    from vla.models.ema import ema_update, make_ema_teacher
    from vla.models.load import load_encoder
    from vla.models.proclip import ImageTextAligner, ProCLIPModel, save_adapter
    from vla.models.clip import save_clip

    td = training_data(data)
    clip_ref, embedder, adapter, inputs = _starting_point(cfg)
    clip = load_encoder(clip_ref)
    if adapter is None:
        torch.manual_seed(cfg.train.seed)
        preset = getattr(AdapterConfig, cfg.adapter)
        adapter = Adapter.from_config(preset(embedder.dim, clip.embed_dim))
    if (Path(clip_ref) / "manifest.json").exists():
        inputs["clip"] = open_artifact(clip_ref)
    dist = init_distributed()
    source = resolve_data(td.path)

    # Φ is frozen: its features for every caption come from the cache (shared with `vla distill`)
    from vla.stages.distill import read_captions

    table, _ = read_captions(td.path, "long_caption", cfg.data.max_skip_fraction)
    seed = cfg.train.seed
    # A sample trains on its long caption or on its short one, fixed by its key: only the long
    # captions that will be drawn are encoded (about long_caption_prob of them; MiniLM reads a
    # long caption ~7× slower than a short one). The short ones are all kept: `vla distill`
    # cached exactly that entry, so it is a cache hit.
    prob = cfg.long_caption_prob

    def phi_features(column: str, rows):
        return cached_features(f"phi.{column}", rows, model_identity=embedder.digest(), data_digest=source.digest(),
                               encode=embedder.embed, batch_size=cfg.embedder.batch_size,
                               model=embedder.model, device=dist.device)[0]

    phi = {"short": phi_features("caption", lambda: table.rows("short"))}
    if prob > 0:
        phi["long"] = phi_features("long_caption", lambda: (r for r in table.rows("second")
                                                            if _trains_on_long(seed, r[0], prob)))

    for p in clip.model.parameters():  # the CLIP text tower is not used in this stage
        p.requires_grad_(False)
    visual = clip.model.visual
    for p in visual.parameters():
        p.requires_grad_(True)
    use_reg = cfg.reg_weight > 0
    model = ImageTextAligner(visual, adapter, LogitScale(), make_ema_teacher(visual) if use_reg else None)
    model.train()
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       rank=dist.rank, world_size=dist.world_size)
    skips = SkipCounter()

    def transform(sample) -> dict:
        return {"image": clip.preprocess(sample.image), "key": sample.key}

    image_batches = image_text_batches(source, transform, cfg.train, cfg.data, dist, skips, str(td.path))

    def batches(start_step: int):
        for batch in image_batches(start_step):
            keys = batch["key"]
            batch["phi"] = phi["short"].lookup(keys)
            rows = [i for i, k in enumerate(keys) if prob > 0 and _trains_on_long(seed, k, prob)]
            if rows:
                batch["phi"][rows] = phi["long"].lookup([keys[i] for i in rows])
            yield batch

    def step(m, batch):
        img, txt, scale, img_t = m(batch["image"], batch["phi"])
        info = loss_fn(img, txt, scale)
        out = {"loss": info, "info": info.detach(), "logit_scale": scale.detach()}
        if use_reg:
            reg = self_distillation_loss(img, img_t)["loss"]
            out.update(loss=info + cfg.reg_weight * reg, reg=reg.detach())
        return out

    def after_step(m, _step):
        if use_reg and cfg.ema_momentum < 1.0:
            ema_update(m.teacher, m.visual, cfg.ema_momentum)

    recipe = {**asdict(cfg), "clip_identity": model_identity(clip_ref)}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs={**td.inputs, **inputs}, force=force,
                         command=command) as art:
        train_on_pairs(art, cfg, model, step, batches, dist, skips, str(td.path), after_step=after_step)
        if dist.rank == 0:
            model.eval()
            save_clip(clip, art.dir / "model")
            save_adapter(adapter, art.dir)
            (art.dir / "embedder.json").write_text(json.dumps(embedder.spec, indent=1))
            evaluate_into(art, ProCLIPModel(clip, embedder, adapter, name=out.name), td.eval_dir, cfg.eval)
    return art.artifact
