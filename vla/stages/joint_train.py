"""`vla joint-train`: MM-GEM stage 1 — one causal LM learns to embed and to caption at once.

Story (docs/methods.md §3): image–text pairs → an open_clip ViT read as a patch-token feature map V,
and one causal LM with the new tokens [EMB] and [CAP] (`vla.models.mmgem`) →

    v    = h1(MeanPool(V))                      t = h2(LM([text, [EMB]]) at [EMB])
    V_in = h3(v)
    L    = L_emb + w_gen·L_gen                  both in every batch; w_gen = `gen_weight` (paper: 1)
    L_emb = CE(s·v tᵀ, y) + CE(s·t vᵀ, y)       the paper's sum of the directions (`emb_directions:
                                                mean` halves it, open_clip's ClipLoss); s = 1/τ,
                                                τ₀ = 0.07, τ ≥ 0.01; local loss + gather-with-grad
    L_gen = −mean log p(c_i | [BOS,] V_in, [CAP], c_<i) over the caption's tokens and end of text only

`objective: embed | caption` keeps one term — the paper's ablation at the same budget.
Everything trains, in two learning-rate groups: the projections (h1–h3, τ) at `train.lr` and the
backbones (ViT, LM) at `backbone_lr_scale` × `train.lr` (paper: 5e-4 and 5e-5), with LAMB and
weight decay 0.05 (timm's LAMB; `train.optimizer: adamw` is recorded as a deviation).
`lm_lr_scale` gives the LM a rate of its own (an LM at random init, `llm: null`).
Claim (a)'s evidence goes into the manifest: ‖w_emb·∇L_emb‖ and ‖w_gen·∇L_gen‖ and their cosine on
the LM, the tower and h1 at `grad_norm_steps` (on a fixed batch), and both loss curves.
→ `model/` (`save_mmgem`: the LM and tokenizer in transformers' layout, the tower and heads in
safetensors), caption counts (trained, truncated at `model.max_text_tokens`), samples/s.

The embedded curriculum starts from the tiny Llama `vla pretrain-lm` pre-trained on the world's
captions (`--llm runs/mmgem/lm`, a pretrain-lm artifact), as the paper starts from TinyLlama, with
the small CLIP's image tower (`--vision runs/proclip/clip`, a pretrain artifact, or a registry
name). `llm: null` builds that Llama at random init instead, its byte-level BPE trained here on
the data's captions (short and long).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import UserError
from vla.models.mmgem.causal_lm import TinyLlamaSize
from vla.models.mmgem import MMGEMConfig
from vla.stages.common import EvalConfig, evaluate_into, image_text_batches, train_on_pairs, training_data
from vla.stages.common import DataConfig
from vla.train import TrainConfig

KIND = "joint-train"
#: artifacts whose CLIP image tower `--vision` may start from (their `model/` is open_clip's layout)
VISION_KINDS = ("pretrain", "contrast-tune")
#: artifacts whose LM `--llm` may start from (their `model/` is transformers' layout)
LLM_KINDS = ("pretrain-lm",)


#: what the manifest says, plainly, about the LM forward of a training step (`mmgem.lm_forward`)
LM_FORWARD_STATEMENT = {
    "joint": "One LM forward per step is shared between [EMB] and [CAP]: the [text, [EMB]] rows and the "
             "[V_in, [CAP], caption] rows are stacked along the batch into one call. No hidden state is "
             "shared between them (t must not see the image); see `vla bench --only g` against two forwards.",
    "embed": "One LM forward per step, over the [text, [EMB]] rows only (objective: embed).",
    "caption": "One LM forward per step, over the [V_in, [CAP], caption] rows only (objective: caption).",
}


#: L_emb's weight on ClipLoss (the mean of the two directions): "sum" is the paper's CE_v→t + CE_t→v
EMB_WEIGHTS = {"sum": 2.0, "mean": 1.0}
GRAD_NORMS_FILE = "gradient_norms.jsonl"


def loss_deviation(cfg) -> str | None:
    """How the recipe's L departs from the paper's L = (CE_v→t + CE_t→v) + L_gen, or None."""
    out = []
    if cfg.emb_directions != "sum":
        out.append("L_emb is the mean of the two InfoNCE directions (the paper sums them): half the "
                   "contrastive gradient relative to L_gen")
    if cfg.gen_weight != 1.0:
        out.append(f"L_gen weighted {cfg.gen_weight:g} (the paper: 1)")
    return "; ".join(out) or None


class GradientProbe:
    """Measures `objective_gradient_norms` on (the first `grad_norm_batch` samples of) the run's
    first batch before the first step (step 0, a fresh run only) and after each of the recipe's
    probe steps; rank 0 appends them to a JSONL file in the artifact, which survives a resume."""

    def __init__(self, trainer, cfg, path: Path, write: bool, groups: dict) -> None:
        self.trainer, self.steps, self.path, self.write = trainer, cfg.probe_steps(), path, write
        self.n = cfg.grad_norm_batch
        self.groups = {k: [p for p in v if p.requires_grad] for k, v in groups.items()}
        self.batch = None

    def first_batch(self, batch) -> None:
        if self.batch is not None:
            return
        self.batch = (batch["image"][: self.n].detach(), list(batch["caption"][: self.n]))
        if 0 in self.steps and not (self.path.parent / "checkpoints" / "last.pt").exists():
            self._measure(0)

    def after_step(self, model, step: int) -> None:
        if step in self.steps and self.batch is not None:
            self._measure(step)

    def _measure(self, step: int) -> None:
        from vla.models.mmgem.objective import objective_gradient_norms

        with torch.autocast(self.batch[0].device.type, enabled=False):
            record = {"step": step, **objective_gradient_norms(self.trainer, *self.batch, self.groups)}
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        by_step = {r["step"]: r for r in map(json.loads, self.path.read_text().splitlines()) if r}
        return [by_step[s] for s in sorted(by_step)]


def loss_curves(metrics: Path) -> dict[str, list]:
    """{"step", "loss", "emb", "gen"} columns of the training log (the terms a run computed)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    keys = ["step"] + [k for k in ("loss", "emb", "gen") if rows and k in rows[0]]
    return {k: [r[k] for r in rows] for k in keys}


def _paper_train() -> TrainConfig:
    return TrainConfig(lr=5e-4, optimizer="lamb", weight_decay=0.05)


@dataclass
class JointTrainRecipe:
    vision: str = "vla-tiny-clip"           # open_clip image tower: registry name, name:pretrained, or a pretrain artifact
    llm: Optional[str] = None               # causal LM (tinyllama, hub id, directory, a pretrain-lm artifact);
                                            # null = the embedded tiny Llama at random init
    tiny_lm: TinyLlamaSize = field(default_factory=TinyLlamaSize)  # the embedded LM's size (llm: null only)
    model: MMGEMConfig = field(default_factory=MMGEMConfig)
    objective: Literal["joint", "embed", "caption"] = "joint"
    backbone_lr_scale: float = 0.1          # ViT and LM lr = this × train.lr (paper: 5e-5 / 5e-4)
    lm_lr_scale: Optional[float] = None     # the LM's own scale; null = backbone_lr_scale (the paper).
                                            # The embedded LM starts from random weights, not TinyLlama's
    long_caption_prob: float = 0.0          # chance, drawn once per sample key (the same every epoch), of its long caption
    emb_directions: Literal["sum", "mean"] = "sum"  # L_emb = CE_v→t + CE_t→v (the paper's Eq. 2) or their mean
    gen_weight: float = 1.0                 # w_gen in L = L_emb + w_gen·L_gen; 1 = the paper (≠ 1: a labelled deviation)
    grad_norm_steps: Optional[list[int]] = None  # steps after which claim (a)'s gradient norms are measured;
                                                 # null = 0 (init), ¼, ½ and all of train.steps; [] = none
    grad_norm_batch: int = 32               # samples of the first batch the gradient norms are measured on
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
        if not self.gen_weight > 0:
            raise UserError(f"gen_weight must be positive, not {self.gen_weight}")
        if self.grad_norm_batch < 2:
            raise UserError(f"grad_norm_batch must be at least 2 (InfoNCE needs negatives), not {self.grad_norm_batch}")

    def probe_steps(self) -> list[int]:
        """The steps after which the gradient norms are measured (0 = before training)."""
        if self.grad_norm_steps is not None:
            return sorted(set(self.grad_norm_steps))
        steps = self.train.steps
        return sorted({0, max(1, steps // 4), max(1, steps // 2), steps})


def llm_source(ref: str | None) -> tuple[str | None, dict[str, Artifact]]:
    """`--llm` as a `load_causal_lm` name: a `pretrain-lm` artifact's `model/` directory, else the name."""
    if ref is not None and (Path(ref) / "manifest.json").exists():
        art = open_artifact(ref, LLM_KINDS, role="--llm")
        return str(art.path / "model"), {"llm": art}
    return ref, {}


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


def parameter_groups(model, objective: str) -> dict[str, list]:
    """The trained parameters by learning-rate group: projections (h1–h3, τ), vision, lm
    (`learning_rate_groups` makes the optimizer's groups of them)."""
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
    from vla.models.mmgem.objective import MMGEMTrainer, learning_rate_groups, optimizer_record

    # inputs: the --out, the data, the image tower, the LM (refused before any compute when wrong)
    claim_out(out, force=force, inputs={"data": data, "vision": cfg.vision, "llm": cfg.llm})
    td = training_data(data)
    vision, inputs = vision_source(cfg.vision)
    llm, llm_inputs = llm_source(cfg.llm)
    inputs.update(llm_inputs)
    dist = init_distributed(cfg.train.device)
    source = resolve_data(td.path)

    # models: the embedded default trains its tokenizer on the captions first
    torch.manual_seed(cfg.train.seed)  # a random-init tower (a registry name) is part of the recipe
    captions = tokenizer_captions(td.path, cfg.data.max_skip_fraction) if cfg.llm is None else ()
    model = build_mmgem(vision, llm, captions, cfg.model, seed=cfg.train.seed, lm_size=cfg.tiny_lm)
    lm_record = ({"name": cfg.llm, **({"pretrain_lm": {k: llm_inputs["llm"].manifest["metrics"][k]
                                                       for k in ("val_perplexity", "val_perplexity_at_init")}}
                                      if llm_inputs else {})} if cfg.llm else
                 {"name": "embedded tiny Llama", "size": asdict(cfg.tiny_lm), "vocab": len(model.tokenizer),
                  "tokenizer_trained_on": len(captions)})
    groups = parameter_groups(model, cfg.objective)
    scales = {"projections": 1.0, "vision": cfg.backbone_lr_scale,
              "lm": cfg.backbone_lr_scale if cfg.lm_lr_scale is None else cfg.lm_lr_scale}
    model.train()
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       rank=dist.rank, world_size=dist.world_size)
    trainer = MMGEMTrainer(model, cfg.objective, loss_fn, emb_weight=EMB_WEIGHTS[cfg.emb_directions],
                           gen_weight=cfg.gen_weight)

    # data: one text per sample (a short caption, or its long one), the image as the tower sees it
    choose = caption_chooser(cfg.train.seed, cfg.long_caption_prob)

    preprocess = model.preprocess  # what the DataLoader workers need, not the whole model

    def transform(sample) -> dict:
        return {"image": preprocess(sample.image), "caption": choose(sample), "key": sample.key}

    skips = SkipCounter()
    batches = image_text_batches(source, transform, cfg.train, cfg.data, dist, skips, str(td.path))

    def param_groups(m):
        return learning_rate_groups(m, groups, cfg.train.weight_decay, scales)

    with ArtifactBuilder(out, KIND, recipe=cfg, inputs={**td.inputs, **inputs}, force=force,
                         command=command) as art:
        probe = GradientProbe(trainer, cfg, art.dir / GRAD_NORMS_FILE, dist.rank == 0,
                              {"lm": groups["lm"], "vision": groups["vision"], "h1": list(model.h1.parameters())})

        def step(m, batch):
            probe.first_batch(batch)
            return m(batch["image"], batch["caption"])

        result = train_on_pairs(art, cfg, trainer, step, batches, dist, skips, str(td.path),
                                param_groups=param_groups, after_step=probe.after_step)
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
                "loss_weights": {"emb": EMB_WEIGHTS[cfg.emb_directions], "gen": cfg.gen_weight,
                                 "emb_directions": cfg.emb_directions,
                                 "deviation_from_paper": loss_deviation(cfg)},
                # claim (a): each objective's gradient on the LM, the tower and h1 at a few steps,
                # and both loss curves (means over each log window of metrics.jsonl)
                "gradient_norms": probe.records(),
                "loss_curves": loss_curves(art.dir / "metrics.jsonl"),
            }
            evaluate_into(art, model, td.eval_dir, cfg.eval)
    return art.artifact

