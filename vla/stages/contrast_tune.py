"""`vla contrast-tune`: ProCLIP stage 2 — contrastive tuning with self-distillation regularisation;
with `--init random` the same command is the LLM2CLIP baseline.

Story (docs/methods.md §1): image–text pairs → the CLIP image tower E_I (trained), the frozen
embedder Φ (cached features only) and the adapter g (from `vla distill`, or random) →

    L = L_info + λ · L_reg
    L_info = ½[CE(s·I Tᵀ) + CE(s·T Iᵀ)]           (learnable s, clamped at 100; local loss +
                                                    gather-with-grad under torchrun)
    L_reg  = ‖E_I(x) − E_I^t(x)‖² + smoothL1(pdist(E_I(x)), pdist(E_I^t(x)))   (sums over the
             global batch at any number of ranks: λ means the same on one GPU or eight)
    E_I^t  ← m·E_I^t + (1−m)·E_I after every step    (m = 1.0: the frozen copy of the public code)

Each time a sample is read it trains on a caption drawn anew: its long caption with probability
`long_caption_prob` (when it has one), else one of its short captions, uniformly. The draw comes
from torch's generator, which the data stream seeds per sample by (seed, epoch, sample key), and
is made before the image is augmented: a sample's caption in an epoch is the same whatever the
number of GPUs or DataLoader workers and after a resume, and new every epoch.
Φ of every caption that can be drawn is therefore cached (LLM2CLIP precomputes them likewise).

→ the tuned image tower in open_clip's layout, the adapter, the embedder named, eval metrics.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Optional, Sequence

import torch

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import UserError
from vla.data.captions import Captions, Rows, read_captions, text_windows
from vla.models.embedder import EmbedderConfig
from vla.models.load import model_identity
from vla.stages.common import (DataConfig, EvalConfig, draft_size, evaluate_into, image_text_batches, train_on_pairs,
                               training_data)
from vla.train import TrainConfig

if TYPE_CHECKING:
    from vla.cache import FeatureTable

KIND = "contrast-tune"


@dataclass
class ContrastTuneRecipe:
    init: str = "distill"                   # a distill artifact's path, or "random" (LLM2CLIP baseline)
    clip: Optional[str] = None              # the CLIP whose image tower is tuned; default: distill's teacher
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)  # used with init=random
    adapter: Literal["proclip", "llm2clip"] = "llm2clip"  # adapter shape when init=random
    # λ; 0 turns L_reg off. Default: 1 from a distill artifact (ProCLIP), 0 with init=random, so
    # that `--init random` alone is the LLM2CLIP baseline
    reg_weight: Optional[float] = None
    ema_momentum: float = 1.0               # teacher image encoder: 1.0 = frozen copy, <1 = EMA
    long_caption_prob: float = 0.5          # chance, drawn each epoch per sample, of its long caption
    local_loss: bool = True
    gather_with_grad: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name, value in (("long_caption_prob", self.long_caption_prob), ("ema_momentum", self.ema_momentum)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be between 0 and 1, not {value}")
        if self.reg_weight is None:
            self.reg_weight = 0.0 if self.init == "random" else 1.0
        if self.reg_weight < 0:
            raise UserError(f"reg_weight must be 0 or more, not {self.reg_weight}")


#: what `caption_index` says when a sample drew its long caption
LONG = -1


def draw_caption(sample, long_caption_prob: float) -> int:
    """The caption a sample trains on this time: LONG, or the index of one of its short captions.
    Draws from torch's generator, seeded by the data stream by (seed, epoch, key): call it first
    in a transform, so that no other draw (an augmentation) shifts it."""
    if sample.long_caption and float(torch.rand(())) < long_caption_prob:
        return LONG
    return int(torch.randint(len(sample.captions), ()))


def caption_columns(captions: Captions, long: bool) -> dict[int, tuple[str, Rows]]:
    """{caption index (LONG for the long caption): (cache column, rows)} of every caption a
    sample can draw; the rows are streams read from the data again each time."""
    columns = {i: captions.caption_column(i) for i in range(captions.max_captions)}
    if long and captions.long_count:
        columns[LONG] = ("long_caption", captions.long_column())
    return columns


def phi_columns(captions: Captions, embedder, data_digest: str, batch_size: int, device,
                long: bool = True) -> dict[int, "FeatureTable"]:
    """Φ of every caption a sample can draw, by caption index: memory-mapped cache entries (the
    first two are `vla distill`'s entries when every sample has two captions)."""
    from vla.cache import cached_features

    return {i: cached_features(f"phi.{column}", rows, model_identity=embedder.digest(), data_digest=data_digest,
                               encode=embedder.embed, batch_size=batch_size, model=embedder.model,
                               device=device)[0]
            for i, (column, rows) in caption_columns(captions, long).items()}


def embedder_truncated(captions: Captions, embedder, long: bool) -> dict[str, int]:
    """How many short and long captions the embedder cut at its max_length, streamed."""
    counts = {"max_length": embedder.max_length, "captions": 0, "long_captions": 0}
    for i, (_, rows) in caption_columns(captions, long).items():
        counts["long_captions" if i == LONG else "captions"] += sum(map(embedder.truncated, text_windows(rows)))
    return counts


def phi_batches(image_batches: Callable[[int], Iterator[dict]], columns: dict[int, "FeatureTable"],
                dim: int) -> Callable[[int], Iterator[dict]]:
    """`image_batches` with each sample's Φ(T) of the caption it drew (its `caption_index`, see
    `draw_caption`) looked up in that caption's cache column."""
    def batches(start_step: int) -> Iterator[dict]:
        for batch in image_batches(start_step):
            keys, drawn = batch["key"], batch.pop("caption_index").tolist()
            batch["phi"] = torch.empty(len(keys), dim)
            for column in set(drawn):
                rows = [i for i, c in enumerate(drawn) if c == column]
                batch["phi"][rows] = columns[column].lookup([keys[i] for i in rows])
            yield batch
    return batches


def contrast_step(loss_fn: Callable, reg_weight: float, rank: int = 0, world_size: int = 1) -> Callable:
    """The contrast-tune step on a batch {image, phi}:

        L = InfoNCE(E_I(x), A(Φ(T)))  +  λ · L_reg(E_I(x), E_I^teacher(x))      (λ = reg_weight)

    InfoNCE is `loss_fn` (open_clip's ClipLoss over the global batch); L_reg is
    `vla.losses.self_distillation_loss`, left out when λ = 0."""
    from vla.losses import self_distillation_loss

    def step(m, batch: dict) -> dict:
        img, txt, scale, img_t = m(batch["image"], batch["phi"])
        info = loss_fn(img, txt, scale)
        out = {"loss": info, "info": info.detach(), "logit_scale": scale.detach()}
        if reg_weight > 0:
            reg = self_distillation_loss(img, img_t, rank=rank, world_size=world_size)["loss"]
            out.update(loss=info + reg_weight * reg, reg=reg.detach())
        return out
    return step


def _starting_point(cfg: ContrastTuneRecipe, device):
    """(clip name, embedder, adapter, inputs) from the distill artifact or, for init=random, the recipe."""
    from vla.models.embedder import embedder_from_config
    from vla.models.proclip import embedder_from_spec, load_adapter

    if cfg.init == "random":
        if not cfg.clip:
            raise UserError("contrast-tune --init random needs the CLIP to tune: pass --clip (e.g. --clip clip-vit-l)")
        return cfg.clip, embedder_from_config(cfg.embedder, device=device), None, {}
    art = open_artifact(cfg.init, "distill", role="--init")
    clip_ref = cfg.clip or json.loads((art.path / "teacher.json").read_text())["teacher"]
    adapter = load_adapter(art.path).train()
    return clip_ref, embedder_from_spec(art.path, device=device), adapter, {"init": art}


def run(cfg: ContrastTuneRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.distributed import init_distributed
    from vla.losses import ClipLoss, LogitScale
    from vla.models.proclip.adapter import Adapter, AdapterConfig
    from vla.models.proclip.ema import ema_update, make_ema_teacher
    from vla.models.load import load_encoder
    from vla.models.proclip import ImageTextAligner, ProCLIPModel, save_adapter
    from vla.models.clip import save_clip

    claim_out(out, force=force, inputs={"data": data, "init": cfg.init, "clip": cfg.clip,
                                        "embedder": cfg.embedder.name})
    td = training_data(data)
    dist = init_distributed(cfg.train.device)  # the one place the device is decided
    clip_ref, embedder, adapter, inputs = _starting_point(cfg, dist.device)
    clip = load_encoder(clip_ref)  # the training loop moves what trains to the device
    if adapter is None:
        torch.manual_seed(cfg.train.seed)
        preset = getattr(AdapterConfig, cfg.adapter)
        adapter = Adapter.from_config(preset(embedder.dim, clip.embed_dim))
    if (Path(clip_ref) / "manifest.json").exists():
        inputs["clip"] = open_artifact(clip_ref)
    source = resolve_data(td.path)

    # Φ is frozen: its features for every caption that can be drawn come from the cache, one entry
    # per caption column (streamed from the data: nothing holds the texts); a batch finds its rows by key
    captions, _ = read_captions(td.path, cfg.data.max_skip_fraction)
    columns = phi_columns(captions, embedder, source.digest(), cfg.embedder.batch_size, dist.device,
                          long=cfg.long_caption_prob > 0)

    for p in clip.model.parameters():  # the CLIP text tower is not used in this stage
        p.requires_grad_(False)
    visual = clip.model.visual
    for p in visual.parameters():
        p.requires_grad_(True)
    use_reg = cfg.reg_weight > 0
    clip.normalize_uint8_inputs(visual)  # before the teacher's copy, which keeps the hook
    model = ImageTextAligner(visual, adapter, LogitScale(), make_ema_teacher(visual) if use_reg else None)
    model.train()
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       rank=dist.rank, world_size=dist.world_size)
    skips = SkipCounter()

    # uint8 through the workers (4× fewer bytes than fp32); the tower normalises on the device
    image_transform = clip.uint8_train_preprocess(cfg.data.train_preprocess)

    def transform(sample) -> dict:
        drawn = draw_caption(sample, cfg.long_caption_prob)  # first: see draw_caption
        return {"image": image_transform(sample.image), "key": sample.key, "caption_index": drawn}

    image_batches = image_text_batches(source, transform, cfg.train, cfg.data, dist, skips, str(td.path),
                                       draft_size=draft_size(clip, cfg.data))

    batches = phi_batches(image_batches, columns, embedder.dim)
    step = contrast_step(loss_fn, cfg.reg_weight, dist.rank, dist.world_size)

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
            art.counts["embedder_truncated"] = embedder_truncated(captions, embedder, long=LONG in columns)
            evaluate_into(art, ProCLIPModel(clip, embedder, adapter, name=out.name), td.eval_dir, cfg.eval)
    return art.artifact
