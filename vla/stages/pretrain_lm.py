"""`vla pretrain-lm`: the embedded world's LM learns its language before MM-GEM joins it to images.

Story: MM-GEM (docs/methods.md §3) starts from TinyLlama, an LM that already writes English; the
embedded default has no such LM, so it pre-trains one, as `vla pretrain` pre-trains the small
CLIP the curricula start from. Training captions (short and long) of `--data` →

    tokenizer  a byte-level BPE trained on those captions (`train_caption_tokenizer`)
    LM         the tiny Llama of `tiny_lm`, seeded random weights (`build_tiny_llama`)
    row        [<|endoftext|>, c_1 … c_n, <|endoftext|>]   (end of text opens a row as GPT-2's does:
               the tokenizer has no BOS), cut at `max_tokens`
    L_LM       = −mean_{rows, i ≥ 1} log p(c_i | c_<i)       next-token cross-entropy over the real
                                                            tokens (padding masked)

trained by the one loop (`vla.train`): each step draws `batch_size` captions (the global batch)
with a generator seeded by (seed, step), so a resumed run draws what an uninterrupted one does and
N ranks (each its contiguous share, the token mean taken over the global batch) train as one.
Held-out perplexity = exp(Σ NLL / Σ predicted tokens) over held-out captions: the synth
artifact's `val` split, or else the training captions whose key hashes into `heldout_fraction`
(those are then not trained on). It is measured before training (the untrained LM) and after.
→ `model/`: the LM and its tokenizer in transformers' layout (what `joint-train --llm <artifact>`
loads), `val_perplexity` and `val_perplexity_at_init` in the manifest's metrics.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from vla.artifacts import Artifact, ArtifactBuilder, claim_out
from vla.errors import UserError
from vla.losses import caption_loss
from vla.models.mmgem.causal_lm import TinyLlamaSize
from vla.stages.common import DataConfig, training_data
from vla.train import TrainConfig

KIND = "pretrain-lm"
IGNORE_INDEX = -100


@dataclass
class PretrainLMRecipe:
    tiny_lm: TinyLlamaSize = field(default_factory=TinyLlamaSize)
    max_tokens: int = 128             # tokens of a row at most (end-of-text marks included)
    heldout_fraction: float = 0.05    # without a val split: this share of captions (by key) is held out
    max_heldout: int = 2000           # held-out captions scored at most (the first, in data order)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, warmup_steps=20))

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise UserError(f"max_tokens must be at least 2, not {self.max_tokens}")
        if self.max_tokens > self.tiny_lm.max_position_embeddings:
            raise UserError(f"max_tokens {self.max_tokens} exceeds tiny_lm.max_position_embeddings "
                            f"{self.tiny_lm.max_position_embeddings}; lower max_tokens")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise UserError(f"heldout_fraction must be between 0 and 1, not {self.heldout_fraction}")


class CausalLMTrainer(nn.Module):
    """The LM and its loss in one forward call (what the loop and DDP see): L_LM of the docstring."""

    def __init__(self, lm: nn.Module, world_size: int = 1) -> None:
        super().__init__()
        self.lm = lm
        self.world_size = world_size

    def forward(self, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        # the token mean over the global batch at any rank count (`caption_loss`), as one process's
        logits = self.lm(input_ids=ids, attention_mask=mask).logits
        return {"loss": caption_loss(logits, _labels(ids, mask), IGNORE_INDEX, world_size=self.world_size)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """`train.grad_checkpointing`: transformers' activation checkpointing of the decoder layers."""
        from vla.models.mmgem.causal_lm import set_lm_checkpointing

        set_lm_checkpointing(self.lm, enable)


def _labels(ids: Tensor, mask: Tensor) -> Tensor:
    return ids.masked_fill(mask == 0, IGNORE_INDEX)  # transformers shifts them by one itself


def _rows(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    eot = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [([eot] + row + [eot])[:max_tokens] for row in ids]


def _pad(rows: Sequence[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def perplexity(lm: nn.Module, rows: Sequence[list[int]], pad: int, batch_size: int = 64) -> float:
    """exp(Σ NLL / Σ predicted tokens) of `rows` under `lm` (the docstring's held-out perplexity)."""
    device = next(lm.parameters()).device
    was_training = lm.training
    lm.eval()
    nll, count = 0.0, 0
    for s in range(0, len(rows), batch_size):
        ids, mask = (t.to(device) for t in _pad(rows[s:s + batch_size], pad))
        logits = lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = _labels(ids, mask)[:, 1:]
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((target != IGNORE_INDEX).sum())
    lm.train(was_training)
    return math.exp(nll / max(count, 1))


def read_texts(path: Path | str, max_skip_fraction: float) -> list[tuple[str, str]]:
    """(sample key, text) of every caption of `path`, short and long, without decoding an image."""
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data

    skips = SkipCounter()
    texts = [(s.key, t) for s in resolve_data(path).iter_samples(skips, decode=False)
             for t in s.captions + ([s.long_caption] if s.long_caption else [])]
    skips.check(max_skip_fraction, str(path))
    if not texts:
        raise UserError(f"{path}: no captions to pre-train the LM on; check --data")
    return texts


def _held_out(key: str, fraction: float) -> bool:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2 ** 64 < fraction


def run(cfg: PretrainLMRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.distributed import init_distributed
    from vla.models.mmgem.causal_lm import build_tiny_llama
    from vla.train import train

    # inputs: the --out, the data (its train split, and its val split when it is a synth artifact)
    claim_out(out, force=force, inputs={"data": data})
    td = training_data(data)
    dist = init_distributed(cfg.train.device)
    texts = read_texts(td.path, cfg.data.max_skip_fraction)
    if td.eval_dir is not None and any((Path(data) / "val").glob("*.tar")):  # a world built with n_val: 0 has none
        heldout_from = "the synth artifact's val split"
        heldout = [t for _, t in read_texts(Path(data) / "val", cfg.data.max_skip_fraction)]
        trained = [t for _, t in texts]
    else:
        heldout_from = f"the training captions whose key hashes below {cfg.heldout_fraction:g}"
        heldout = [t for k, t in texts if _held_out(k, cfg.heldout_fraction)]
        trained = [t for k, t in texts if not _held_out(k, cfg.heldout_fraction)]
    if not heldout or not trained:
        raise UserError(f"{data}: {len(trained)} captions to train on and {len(heldout)} held out; "
                        "pass more data or change heldout_fraction")

    # model: a tokenizer trained on the training captions, the tiny Llama at its seeded init
    lm, tokenizer = build_tiny_llama(trained, cfg.tiny_lm, seed=cfg.train.seed)
    lm.to(dist.device)
    rows = _rows(tokenizer, trained, cfg.max_tokens)
    heldout_rows = _rows(tokenizer, heldout[: cfg.max_heldout], cfg.max_tokens)
    pad = tokenizer.pad_token_id
    at_init = perplexity(lm, heldout_rows, pad)
    lm.train()
    model = CausalLMTrainer(lm, dist.world_size)

    # data: train.batch_size is the global batch, drawn by (seed, step), so a resume draws the same
    # and N ranks train on the same captions as one process (rank r takes its contiguous share)
    if cfg.train.batch_size % dist.world_size:
        raise UserError(f"train.batch_size {cfg.train.batch_size} is the global batch and must divide evenly "
                        f"over {dist.world_size} ranks; choose a multiple of {dist.world_size}")
    share = cfg.train.batch_size // dist.world_size

    def batches(start_step: int):
        for step in range(start_step, cfg.train.steps):
            for micro in range(cfg.train.grad_accum):
                rng = random.Random(f"{cfg.train.seed}:{step}:{micro}")
                drawn = rng.choices(range(len(rows)), k=cfg.train.batch_size)
                ids, mask = _pad([rows[i] for i in drawn[dist.rank * share:(dist.rank + 1) * share]], pad)
                yield {"ids": ids, "mask": mask}

    def step(m, batch):
        return m(batch["ids"], batch["mask"])

    with ArtifactBuilder(out, KIND, recipe=cfg, inputs=td.inputs, force=force, command=command) as art:
        result = train(cfg.train, model, step, batches, art.dir)
        if dist.rank == 0:
            lm.eval()
            final = perplexity(lm, heldout_rows, pad)
            lm.save_pretrained(art.dir / "model")
            tokenizer.save_pretrained(art.dir / "model")
            art.counts["train"] = {"steps": result.steps, "samples": result.samples}
            art.counts["captions"] = {"trained": len(trained), "held_out": len(heldout),
                                      "held_out_scored": len(heldout_rows)}
            art.metrics["train"] = result.metrics
            art.metrics["val_perplexity"] = final
            art.metrics["val_perplexity_at_init"] = at_init
            art.extra["lm"] = {"size": asdict(cfg.tiny_lm), "vocab": len(tokenizer),
                               "tokenizer_trained_on": len(trained), "held_out_from": heldout_from,
                               "row": "[<|endoftext|>, caption tokens, <|endoftext|>], cut at max_tokens"}
            art.extra["device"] = str(dist.device)
            art.timings.update(samples_per_s=result.samples_per_s, train_wall_s=result.wall_s)
    return art.artifact
