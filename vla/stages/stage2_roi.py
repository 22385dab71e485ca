"""`vla stage2-roi`: MM-GEM stage 2 — regions, read from the frozen stage-1 feature map.

Story (docs/methods.md §3): a `joint-train` artifact and image–region data (each sample's region
boxes and region captions, as `vla synth` writes them into the sample's JSON) →
the PoolAggregator becomes RoIAlign over the ViT feature map V, and

    region captioning:   V_in = h3(h1(RoIAlign(V, R)));  input [V_in, [CAP_1..CAP_n], caption]
                         L_gen on the region caption; trains h3 and the n soft prompts only
    regional retrieval:  r = h4(h1(RoIAlign(V, R))), h4 linear, initialised to the identity;
                         L_emb = ½[CE(s·r tᵀ) + CE(s·t rᵀ)] against the region caption's
                         t = h2(LM([caption, [EMB]]) at [EMB]) with stage 1's s; trains h4 only
    L = L_emb + L_gen     (`objective: caption | embed` keeps one: then only h3 + prompts, or h4)
    image_captions: on → L += L_gen_img = L_gen of the sample's image caption from
                         [V_in = h3(h1(MeanPool(V))), [CAP]] (stage 1's image path; trains h3), so
                         stage 2 keeps image captioning as the paper's mixed data does

Everything else — the ViT, h1, h2, the LM (every stage-1 row of its tables), τ — is frozen, so
global retrieval (v = h1(MeanPool(V)), t) is stage 1's exactly (tested bit for bit).
One region per image per step, drawn afresh each epoch (so every rank's batch has the same
size for the gathered InfoNCE). Boxes are mapped into the tower's input frame through its
resize and crop. A region with a blank caption or a box the crop removes is not used; a sample
with no usable region is skipped and counted (`no_usable_region` in the manifest's skip counts,
under `data.max_skip_fraction`), as the reader skips a box outside its image.
→ `model/` (`save_mmgem`, soft prompts merged into the LM's table), caption counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import UserError
from vla.stages.common import EvalConfig, evaluate_into, image_text_batches, train_on_pairs, training_data
from vla.stages.common import DataConfig
from vla.train import TrainConfig

KIND = "stage2-roi"
INIT_KINDS = ("joint-train",)
#: which model parts each objective trains (`MMGEM.trainable_parameters` phases)
PHASES = {"joint": ("region-caption", "region-retrieval"), "caption": ("region-caption",),
          "embed": ("region-retrieval",)}


def _paper_train() -> TrainConfig:
    return TrainConfig(lr=5e-4, optimizer="lamb", weight_decay=0.05)


@dataclass
class Stage2RoiRecipe:
    init: str = ""                          # the joint-train artifact to start from (--init)
    soft_prompts: int = 64                  # n, the prompts [CAP_1..CAP_n] replacing [CAP] for regions
    objective: Literal["joint", "embed", "caption"] = "joint"
    #: also train h3 on each sample's image caption through [V_in = h3(h1(MeanPool(V))), [CAP]] (L_gen_img),
    #: as the paper's stage 2 keeps image captions in its data; off: regions only
    image_captions: bool = False
    local_loss: bool = True
    gather_with_grad: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_paper_train)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(sets=[]))

    def __post_init__(self) -> None:
        if self.soft_prompts < 1:
            raise UserError(f"soft_prompts must be at least 1, not {self.soft_prompts}")
        if self.image_captions and self.objective == "embed":
            raise UserError("image_captions trains h3 on image captions; objective embed trains h4 only: "
                            "use objective joint or caption, or image_captions: false")


def trainable(model, objective: str) -> list[torch.nn.Parameter]:
    """Freeze everything but what `objective`'s phases train; the trained parameters."""
    params: list[torch.nn.Parameter] = []
    for phase in PHASES[objective]:
        params += [p for ps in model.trainable_parameters(phase).values() for p in ps]
    for p in params:  # each phase call froze the rest, the earlier phase's parameters included
        p.requires_grad_(True)
    return params


class RegionTransform:
    """Sample → the image as the tower sees it and one of its usable regions (box in the tower's
    input pixels, caption), drawn with the stream's seeded generator (the same after a resume);
    with ``image_captions``, also one of the image's own captions.

    A region is usable when its caption is not blank and the centre crop leaves some of its box;
    a sample with none is skipped and counted (`SkipSample("no_usable_region")`), under the
    recipe's skip limit. `validate` is that test alone, for a resume's counting pass."""

    def __init__(self, model, image_captions: bool = False) -> None:
        spec = model.vision_spec["preprocess_cfg"]
        sides = [spec["size"]] * 2 if isinstance(spec["size"], int) else list(spec["size"])
        if sides[0] != sides[1]:
            raise UserError(f"stage2-roi needs a square image input, got {spec['size']}")
        self.size = sides[0]
        self.resize_mode = spec.get("resize_mode", "shortest")
        self.preprocess = model.preprocess  # what the DataLoader workers need, not the whole model
        self.image_captions = image_captions

    def usable(self, sample) -> tuple[list, torch.Tensor]:
        """The sample's usable regions and their boxes in the tower's input pixels."""
        from vla.data.skips import SkipSample
        from vla.models.mmgem.pool_aggregator import boxes_to_input_frame

        regions = [r for r in sample.regions if r.caption.strip()]
        if regions:
            mapped = boxes_to_input_frame(torch.tensor([r.box for r in regions], dtype=torch.float32),
                                          sample.image.size, self.size, self.resize_mode)
            kept = ((mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])).tolist()
            regions, mapped = [r for r, k in zip(regions, kept) if k], mapped[torch.tensor(kept, dtype=torch.bool)]
        if not regions:
            raise SkipSample("no_usable_region")
        return regions, mapped

    def validate(self, sample) -> None:
        self.usable(sample)

    def __call__(self, sample) -> dict:
        regions, mapped = self.usable(sample)
        i = int(torch.randint(len(regions), ()))
        item = {"image": self.preprocess(sample.image), "box": mapped[i], "caption": regions[i].caption,
                "key": sample.key}
        if self.image_captions:
            item["image_caption"] = sample.captions[int(torch.randint(len(sample.captions), ()))]
        return item


def lm_train_mode_for_checkpointing(lm) -> None:
    """transformers checkpoints a layer only in training mode; the frozen LM's activations are still
    kept for the gradients of h3 and the soft prompts, so with `train.grad_checkpointing` the LM
    goes into training mode — which changes nothing else only when it has no active dropout."""
    rate = max([getattr(lm.config, k, 0.0) or 0.0 for k in ("attention_dropout", "hidden_dropout", "dropout")]
               + [m.p for m in lm.modules() if isinstance(m, torch.nn.Dropout)])
    if rate > 0:
        raise UserError(f"train.grad_checkpointing: the LM has dropout {rate:g}, which training mode would turn on "
                        "in frozen stage 2; set train.grad_checkpointing=false")
    lm.train()


def run(cfg: Stage2RoiRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.distributed import init_distributed
    from vla.losses import ClipLoss
    from vla.models.mmgem import load_mmgem, save_mmgem
    from vla.models.mmgem.objective import MMGEMTrainer, learning_rate_groups, optimizer_record

    # inputs: the --out, the stage-1 artifact (refused before any compute when of another kind), the data
    if not cfg.init:
        raise UserError("stage2-roi needs its stage-1 model: pass --init runs/mmgem/joint (a joint-train artifact)")
    claim_out(out, force=force, inputs={"data": data, "init": cfg.init})
    init = open_artifact(cfg.init, INIT_KINDS, role="--init")
    td = training_data(data)
    dist = init_distributed(cfg.train.device)
    source = resolve_data(td.path)

    # model: stage 1's, plus the soft prompts; only h3 + prompts and/or h4 train
    model = load_mmgem(init.file("model"))
    model.add_soft_prompts(cfg.soft_prompts, seed=cfg.train.seed)
    params = trainable(model, cfg.objective)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    model.eval()  # frozen parts stay in eval mode (no dropout); the heads have none
    if cfg.train.grad_checkpointing:
        lm_train_mode_for_checkpointing(model.lm)
    loss_fn = ClipLoss(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                       rank=dist.rank, world_size=dist.world_size)
    trainer = MMGEMTrainer(model, cfg.objective, loss_fn)

    skips = SkipCounter()
    batches = image_text_batches(source, RegionTransform(model, cfg.image_captions), cfg.train, cfg.data, dist,
                                 skips, str(td.path))

    def step(m, batch):
        return m(batch["image"], batch["caption"], boxes=[b[None] for b in batch["box"]],
                 image_captions=batch.get("image_caption"))

    def param_groups(m):
        return learning_rate_groups(m, {"heads": params}, cfg.train.weight_decay, {"heads": 1.0})

    with ArtifactBuilder(out, KIND, recipe=cfg, inputs={**td.inputs, "init": init}, force=force,
                         command=command) as art:
        train_on_pairs(art, cfg, trainer, step, batches, dist, skips, str(td.path), param_groups=param_groups)
        if dist.rank == 0:
            model.name = out.name
            save_mmgem(model, art.dir / "model")  # merges the trained soft prompts into the table
            art.counts["region_captions"] = trainer.counted()
            art.extra["mmgem"] = {
                "objective": cfg.objective,
                "trained": trained,  # soft_prompts: the [CAP_1..CAP_n] rows, merged into the LM's table
                "soft_prompts": cfg.soft_prompts,
                "tokens": model.token_ids,
                "optimizer": optimizer_record(cfg.train),
                "regions_per_image_per_step": 1,
                "image_captions": cfg.image_captions,  # L += L_gen_img on each sample's image caption
                # samples without a usable region (blank captions, boxes the crop removes) are skipped:
                # counts.train.skipped.no_usable_region, under data.max_skip_fraction
            }
            evaluate_into(art, model, td.eval_dir, cfg.eval)
    return art.artifact
