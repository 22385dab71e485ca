"""`vla joint-train`: MM-GEM stage 1 — one causal LM learns to embed and to caption at once.

Story (METHODS.md §3): image–text pairs → an open_clip ViT read as a patch-token feature map V,
and one causal LM with the new tokens [EMB] and [CAP] (`vla.models.mmgem`) →

    v    = h1(MeanPool(V))                      t = h2(LM([text, [EMB]]) at [EMB])
    V_in = h3(v)
    L    = L_emb + L_gen                        unweighted, both in every batch
    L_emb = ½[CE(s·v tᵀ, y) + CE(s·t vᵀ, y)]    s = 1/τ, τ₀ = 0.07, τ ≥ 0.01; local loss +
                                                gather-with-grad under torchrun
    L_gen = −mean log p(c_i | V_in, [CAP], c_<i) over the caption's tokens and end of text only

`objective: embed | caption` keeps one term — the paper's ablation at the same budget.
Everything trains, in two learning-rate groups: the projections (h1–h3, τ) at `train.lr` and the
backbones (ViT, LM) at `backbone_lr_scale` × `train.lr` (paper: 5e-4 and 5e-5), with LAMB and
weight decay 0.05 (timm's LAMB; `train.optimizer: adamw` is recorded as a deviation).
`lm_lr_scale` gives the LM a rate of its own: the embedded LM starts from random weights.
→ `model/` (`save_mmgem`: the LM and tokenizer in transformers' layout, the tower and heads in
safetensors), caption counts (trained, truncated at `model.max_text_tokens`), samples/s.

The embedded default (`llm: null`) is a tiny Llama built from a config, whose byte-level BPE is
trained here on the data's captions (short and long), with the small CLIP's image tower
(`--vision runs/proclip/clip`, a pretrain artifact, or a registry name).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import UserError
from vla.models.causal_lm import TinyLlamaSize
from vla.models.mmgem import MMGEMConfig
from vla.stages.common import EvalConfig, evaluate_into, image_text_batches, train_on_pairs, training_data
from vla.stages.common import DataConfig
from vla.train import TrainConfig

KIND = "joint-train"
#: artifacts whose CLIP image tower `--vision` may start from (their `model/` is open_clip's layout)
VISION_KINDS = ("pretrain", "contrast-tune")


#: what the manifest says, plainly, about the LM forward of a training step (`mmgem.lm_forward`)
LM_FORWARD_STATEMENT = {
    "joint": "One LM forward per step is shared between [EMB] and [CAP]: the [text, [EMB]] rows and the "
             "[V_in, [CAP], caption] rows are stacked along the batch into one call. No hidden state is "
             "shared between them (t must not see the image); see `vla bench --only g` against two forwards.",
    "embed": "One LM forward per step, over the [text, [EMB]] rows only (objective: embed).",
    "caption": "One LM forward per step, over the [V_in, [CAP], caption] rows only (objective: caption).",
}


def _paper_train() -> TrainConfig:
    return TrainConfig(lr=5e-4, optimizer="lamb", weight_decay=0.05)


@dataclass
class JointTrainRecipe:
    vision: str = "vla-tiny-clip"           # open_clip image tower: registry name, name:pretrained, or a pretrain artifact
    llm: Optional[str] = None               # causal LM (tinyllama, hub id, directory); null = the embedded tiny Llama
    tiny_lm: TinyLlamaSize = field(default_factory=TinyLlamaSize)  # the embedded LM's size (llm: null only)
    model: MMGEMConfig = field(default_factory=MMGEMConfig)
    objective: Literal["joint", "embed", "caption"] = "joint"
    backbone_lr_scale: float = 0.1          # ViT and LM lr = this × train.lr (paper: 5e-5 / 5e-4)
    lm_lr_scale: Optional[float] = None     # the LM's own scale; null = backbone_lr_scale (the paper).
                                            # The embedded LM starts from random weights, not TinyLlama's
    long_caption_prob: float = 0.0          # share of samples (fixed by key) that train on their long caption
    local_loss: bool = True
    gather_with_grad: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_paper_train)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.model.soft_prompts:
            raise UserError("model.soft_prompts belongs to stage 2: set soft_prompts in the stage2-roi recipe")
        for name, scale in (("backbone_lr_scale", self.backbone_lr_scale), ("lm_lr_scale", self.lm_lr_scale)):
            if scale is not None and not 0.0 < scale <= 1.0:
                raise UserError(f"{name} must be in (0, 1], not {scale}")
        if not 0.0 <= self.long_caption_prob <= 1.0:
            raise UserError(f"long_caption_prob must be between 0 and 1, not {self.long_caption_prob}")


def vision_source(ref: str) -> tuple[str, dict[str, Artifact]]:
    """`--vision` as a `load_clip` name: an artifact's open_clip `model/` directory, else the name."""
    if (Path(ref) / "manifest.json").exists():
        art = open_artifact(ref, VISION_KINDS, role="--vision")
        return "local-dir:" + str(art.path / "model"), {"vision": art}
    return ref, {}


def tokenizer_captions(data: Path, max_skip_fraction: float) -> list[str]:
    """Every caption of the training data, short and long, read without decoding an image."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    skips = SkipCounter()
    texts: list[str] = []
    for s in resolve_data(data).iter_samples(skips, decode=False):
        texts += s.captions + ([s.long_caption] if s.long_caption else [])
    skips.check(max_skip_fraction, str(data))
    if not texts:
        raise UserError(f"{data}: no captions to train the embedded LM's tokenizer on; check --data")
    return texts


def freeze_unused(model, objective: str) -> None:
    """An ablation does not train the heads its missing term would (DDP refuses parameters that
    get no gradient, and weight decay must not move them)."""
    unused = {"embed": [model.h3, model.lm.get_output_embeddings()],
              "caption": [model.h2, model.logit_scale]}.get(objective, [])
    for module in unused:
        module.requires_grad_(False)


def lr_groups(model, objective: str) -> dict[str, list]:
    """The trained parameters by learning-rate group: projections (h1–h3, τ), vision, lm."""
    groups = model.trainable_parameters("joint")
    freeze_unused(model, objective)
    in_lm = {id(p) for p in model.lm.parameters()}
    backbones = [p for p in groups["backbones"] if p.requires_grad]
    return {"projections": [p for p in groups["projections"] if p.requires_grad],
            "vision": [p for p in backbones if id(p) not in in_lm],
            "lm": [p for p in backbones if id(p) in in_lm]}


def caption_chooser(seed: int, long_caption_prob: float):
    """Which text a sample trains on: fixed by (seed, key), so a resumed run makes the same choice."""

    def choose(sample) -> str:
        rng = random.Random(f"{seed}:{sample.key}")
        if sample.long_caption and rng.random() < long_caption_prob:
            return sample.long_caption
        return rng.choice(sample.captions)

    return choose


def run(cfg: JointTrainRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.distributed import init_distributed
    from vla.losses import ClipLoss
    from vla.models.mmgem import build_mmgem, save_mmgem
    from vla.models.mmgem_trainer import MMGEMTrainer, learning_rate_groups, optimizer_record

    # inputs: the --out, the data, the image tower, the LM (refused before any compute when wrong)
    claim_out(out, force=force, inputs={"data": data, "vision": cfg.vision, "llm": cfg.llm})
    td = training_data(data)
    vision, inputs = vision_source(cfg.vision)
    dist = init_distributed(cfg.train.device)
    source = resolve_data(td.path)

    # models: the embedded default trains its tokenizer on the captions first
    torch.manual_seed(cfg.train.seed)  # a random-init tower (a registry name) is part of the recipe
    captions = tokenizer_captions(td.path, cfg.data.max_skip_fraction) if cfg.llm is None else ()
    model = build_mmgem(vision, cfg.llm, captions, cfg.model, seed=cfg.train.seed, lm_size=cfg.tiny_lm)
    lm_record = ({"name": cfg.llm} if cfg.llm else
                 {"name": "embedded tiny Llama", "size": asdict(cfg.tiny_lm), "vocab": len(model.tokenizer),
                  "tokenizer_trained_on": len(captions)})
    groups = lr_groups(model, cfg.objective)
    scales = {"projections": 1.0, "vision": cfg.backbone_lr_scale,
              "lm": cfg.backbone_lr_scale if cfg.lm_lr_scale is None else cfg.lm_lr_scale}
    model.train()
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       rank=dist.rank, world_size=dist.world_size)
    trainer = MMGEMTrainer(model, cfg.objective, loss_fn)

    # data: one text per sample (a short caption, or its long one), the image as the tower sees it
    choose = caption_chooser(cfg.train.seed, cfg.long_caption_prob)

    preprocess = model.preprocess  # what the DataLoader workers need, not the whole model

    def transform(sample) -> dict:
        return {"image": preprocess(sample.image), "caption": choose(sample), "key": sample.key}

    skips = SkipCounter()
    batches = image_text_batches(source, transform, cfg.train, cfg.data, dist, skips, str(td.path))

    def step(m, batch):
        return m(batch["image"], batch["caption"])

    def param_groups(m):
        return learning_rate_groups(m, groups, cfg.train.weight_decay, scales)

    with ArtifactBuilder(out, KIND, recipe=cfg, inputs={**td.inputs, **inputs}, force=force,
                         command=command) as art:
        result = train_on_pairs(art, cfg, trainer, step, batches, dist, skips, str(td.path),
                                param_groups=param_groups)
        if dist.rank == 0:
            model.eval()
            model.name = out.name
            save_mmgem(model, art.dir / "model")
            art.counts["captions"] = trainer.counted()  # whole-run totals (checkpointed buffers)
            art.extra["mmgem"] = {
                "objective": cfg.objective,
                "lm": lm_record,
                "vision": cfg.vision,
                "tokens": model.token_ids,
                "optimizer": optimizer_record(cfg.train),
                "peak_lr": {group: cfg.train.lr * scale for group, scale in scales.items()},
                # The [EMB] rows must not see the image and the caption rows attend to V_in, so no
                # hidden state is shared: both kinds of rows go through ONE stacked LM call.
                "lm_forward": {"calls_per_step": 1, "hidden_states_shared": False,
                               "rows": {"joint": "[EMB] rows + caption rows", "embed": "[EMB] rows",
                                        "caption": "caption rows"}[cfg.objective],
                               "statement": LM_FORWARD_STATEMENT[cfg.objective]},
                "step_samples_per_s": result.samples_per_s,  # training steps only (model load, eval excluded)
            }
            evaluate_into(art, model, td.eval_dir, cfg.eval)
    return art.artifact

