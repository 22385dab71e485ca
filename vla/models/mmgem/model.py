"""MM-GEM (arXiv 2405.19333): one vision tower and ONE causal LM that both embeds and captions.

    V     = ViT patch-token feature map                     (B, C, H, W)   open_clip tower
    v     = h1(PoolAggregator(V))                           image embedding (D)
            PoolAggregator = MeanPool (stage 1) | RoIAlign(V, boxes) (stage 2), see pool_aggregator
    t     = h2(LM([text, [EMB]])[last state at [EMB]])      text embedding (D)
    V_in  = h3(v)                                           visual prefix: P vectors in the LM's
                                                            input-embedding space
    caption ~ LM([V_in, [CAP]])                             or [V_in, [CAP_1..CAP_n]] for regions
    region retrieval: h4(h1(RoIAlign(V, R))), h4 linear, initialised to the identity

h1..h4 are single linear layers (the paper's "thin projections"); h1 starts as the CLIP's own
image projection, so stage 1 begins from the CLIP's average-pooled, projected image feature.

The two text paths cannot share hidden states: the embedding path must not see the image (t is
the text alone), while every caption token of the generation path attends to V_in. So a training
step runs the two paths as *one* LM call with the rows stacked along the batch — ``[text, [EMB]]``
rows and ``[V_in, [CAP], caption, eos]`` rows, right-padded to one length — which is one pass
over the weights with larger matrix products, at the compute of two forwards (plus the P+1
padding positions of the shorter embedding rows). Logits are computed for the generation rows
only, and the last hidden state is read at ``[EMB]`` for the embedding rows.

Captioning goes through transformers' ``generate`` (KV cache, greedy or beam search) from
``inputs_embeds = [V_in, prompt]``; `greedy_decode_without_cache` is the naive reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla.errors import UserError
from vla.losses import LogitScale
from vla.models.mmgem.causal_lm import CAP_TOKEN, EMB_TOKEN, add_mode_tokens, soft_prompt_tokens
from vla.models.mmgem.interface import MMGEMInterface, until_eos
from vla.models.mmgem.pool_aggregator import RoIPool, mean_pool

IGNORE_INDEX = -100


@dataclass(frozen=True)
class MMGEMConfig:
    #: the shared image-text embedding size D; None = the CLIP's embedding size (h1 starts as its projection)
    embed_dim: int | None = None
    #: P, the number of LM input vectors h3 makes from v
    prefix_length: int = 1
    #: n, the stage-2 soft prompts [CAP_1..CAP_n] (64 in the paper); 0 = none yet
    soft_prompts: int = 0
    #: caption tokens the LM reads or learns to write, before [EMB] / end of text (paper: 50)
    max_text_tokens: int = 50
    #: RoIAlign bins per side and bilinear samples per bin and side (torchvision's sampling_ratio)
    roi_output_size: int = 4
    roi_sampling_ratio: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VisionTower(nn.Module):
    """An open_clip VisionTransformer read as a patch-token feature map (B, C, H, W).

    Uses open_clip's ``forward_intermediates`` (last block, ``ln_post`` applied, class token
    dropped). The tower's own pooling and projection are not used: MM-GEM pools with its
    PoolAggregator and projects with h1, so the projection is moved out (into h1's initial
    weights) and removed here — a parameter without a gradient would stall DDP.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise UserError(
                f"MM-GEM needs an open_clip ViT image tower (patch tokens); {type(visual).__name__} is not one"
            )
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise UserError("MM-GEM reads the full patch grid: use a vision config without patch_dropout")
        if visual.patch_size[0] != visual.patch_size[1]:
            raise UserError(f"MM-GEM needs square patches, got {visual.patch_size}")
        self.visual = visual
        self.width = visual.conv1.out_channels
        self.patch_size = visual.patch_size[0]
        self.image_size = visual.image_size
        self.clip_projection: Tensor | None = None if visual.proj is None else visual.proj.detach().clone()
        visual.proj = None

    def forward(self, pixels: Tensor) -> Tensor:
        out = self.visual.forward_intermediates(
            pixels, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NCHW"
        )
        return out["image_intermediates"][-1]


def identity_linear(dim: int) -> nn.Linear:
    """h4: a D×D linear layer that starts as the identity, so stage 2 starts from stage 1's space."""
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


class MMGEM(MMGEMInterface, nn.Module):
    """The MM-GEM model; see the module docstring for the maths. What a user calls on a trained
    model (captions, `encode_*`, boxes in either frame) is `MMGEMInterface` (vla/models/mmgem/interface.py).

    ``visual`` is an open_clip VisionTransformer (its ``preprocess`` turns PIL images into its
    input), ``lm`` a transformers causal LM and ``tokenizer`` its tokenizer; the mode tokens are
    added to both here. `build_mmgem` builds one from names, `load_mmgem` from `save_mmgem`'s files.
    """

    def __init__(
        self,
        visual: nn.Module,
        lm: nn.Module,
        tokenizer: Any,
        config: MMGEMConfig = MMGEMConfig(),
        preprocess: Any = None,
        seed: int = 0,
        vision_spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = "mmgem"  # how a report names it; loaders set the artifact's name
        self.config = config
        self.preprocess = preprocess
        #: open_clip's ``model_cfg`` and ``preprocess_cfg`` of the tower, which `save_mmgem` records
        self.vision_spec = vision_spec
        self.tokenizer = tokenizer
        self.lm = lm
        self.token_ids = add_mode_tokens(lm, tokenizer, soft_prompt_tokens(config.soft_prompts), seed=seed)
        self.emb_id = self.token_ids[EMB_TOKEN]
        self.cap_id = self.token_ids[CAP_TOKEN]
        self.soft_prompt_ids = [self.token_ids[t] for t in soft_prompt_tokens(config.soft_prompts)]
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id  # opens embedding and caption rows when the LM has one
        limit = getattr(lm.config, "max_position_embeddings", None)
        longest = (config.prefix_length + max(1, config.soft_prompts) + config.max_text_tokens + 1
                   + (self.bos_id is not None))
        if limit is not None and longest > limit:
            raise UserError(
                f"prefix_length + prompts + max_text_tokens + 1 = {longest} exceeds the LM's "
                f"{limit} positions; lower max_text_tokens"
            )

        self.tower = VisionTower(visual)
        lm_dim = lm.get_input_embeddings().weight.shape[1]
        proj = self.tower.clip_projection
        dim = config.embed_dim or (proj.shape[1] if proj is not None else self.tower.width)
        self.embed_dim = dim
        self.roi_pool = RoIPool(self.tower.patch_size, config.roi_output_size, config.roi_sampling_ratio)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.h1 = nn.Linear(self.tower.width, dim)
            self.h2 = nn.Linear(lm_dim, dim)
            self.h3 = nn.Linear(dim, config.prefix_length * lm_dim)
        self.h4 = identity_linear(dim)
        if proj is not None and proj.shape[1] == dim:
            with torch.no_grad():  # v = MeanPool(V) @ proj: the CLIP's avg-pooled image embedding
                self.h1.weight.copy_(proj.T)
                self.h1.bias.zero_()
        self.tower.clip_projection = None  # used once, above
        self.logit_scale = LogitScale(init_temperature=0.07, min_temperature=0.01)
        #: stage 2 trains the soft prompts as this separate parameter (see `split_soft_prompts`)
        self.soft_prompts: nn.Parameter | None = None

    # ------------------------------------------------------------------ vision side: h1, h3, h4

    @property
    def lm_dim(self) -> int:
        return self.lm.get_input_embeddings().weight.shape[1]

    def image_embedding(self, pixels: Tensor, boxes: Sequence[Tensor] | None = None) -> Tensor:
        """v = h1(PoolAggregator(V)), unnormalised: (B, D), or (ΣK_b, D) with per-image ``boxes``."""
        fmap = self.tower(pixels)
        pooled = mean_pool(fmap) if boxes is None else self.roi_pool(fmap, boxes)
        return self.h1(pooled)

    def region_embedding(self, pixels: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Regional retrieval: h4(h1(RoIAlign(V, R))), unnormalised (ΣK_b, D)."""
        return self.h4(self.image_embedding(pixels, boxes))

    def visual_prefix(self, v: Tensor) -> Tensor:
        """V_in = h3(v): (N, D) → (N, P, d_lm)."""
        return self.h3(v).view(v.shape[0], self.config.prefix_length, self.lm_dim)

    # ------------------------------------------------------------------ text side: tokens, h2

    def _token_embeddings(self, ids: Sequence[int]) -> Tensor:
        table = self.lm.get_input_embeddings()
        return table(torch.tensor(list(ids), dtype=torch.long, device=table.weight.device))

    def prompt_embeddings(self, soft: bool) -> Tensor:
        """(k, d_lm): ``[CAP]``, or the n soft prompts ``[CAP_1..CAP_n]`` (stage 2, regions)."""
        if not soft:
            return self._token_embeddings([self.cap_id])
        if not self.soft_prompt_ids:
            raise UserError("this MM-GEM model has no soft prompts; build it with soft_prompts > 0 (stage 2)")
        if self.soft_prompts is not None:
            return self.soft_prompts
        return self._token_embeddings(self.soft_prompt_ids)

    def _use_soft_prompts(self, boxes: Sequence[Tensor] | None, soft: bool | None) -> bool:
        """As asked; by default the soft prompts for regions when the model has them, else [CAP]."""
        return soft if soft is not None else boxes is not None and bool(self.soft_prompt_ids)

    def add_soft_prompts(self, n: int, seed: int = 0) -> None:
        """Stage 2: give a stage-1 model the n soft prompts ``[CAP_1..CAP_n]``.

        The tokenizer and the embedding tables grow by n rows; every existing row, and so every
        stage-1 computation, is unchanged (tested). A model that already has n soft prompts is
        left alone; one with another number is refused, since its rows were trained.
        """
        if n == self.config.soft_prompts:
            return
        if self.config.soft_prompts:
            raise UserError(f"this MM-GEM model already has {self.config.soft_prompts} soft prompts, "
                            f"not {n}; start stage 2 from a stage-1 (joint-train) model")
        self.token_ids = add_mode_tokens(self.lm, self.tokenizer, soft_prompt_tokens(n), seed=seed)
        self.config = dataclasses.replace(self.config, soft_prompts=n)
        self.soft_prompt_ids = [self.token_ids[t] for t in soft_prompt_tokens(n)]

    def split_soft_prompts(self) -> nn.Parameter:
        """Stage 2: train ``[CAP_1..CAP_n]`` as a parameter of their own; `merge_soft_prompts` after.

        Why not train the rows in place: the table must stay bit-identical except for those
        rows, and masking the table's gradient does not achieve it — AdamW's decoupled weight
        decay shrinks every row it holds, gradient or not.
        """
        self.soft_prompts = nn.Parameter(self._token_embeddings(self.soft_prompt_ids).detach().clone())
        return self.soft_prompts

    def merge_soft_prompts(self) -> None:
        """Write the trained soft prompts back into the LM's embedding table (what export saves)."""
        if self.soft_prompts is None:
            return
        table = self.lm.get_input_embeddings().weight
        with torch.no_grad():
            table[torch.tensor(self.soft_prompt_ids, device=table.device)] = self.soft_prompts.to(table.dtype)
        self.soft_prompts = None

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Caption token ids, cut at ``max_text_tokens``; and how many texts were cut."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        cap = self.config.max_text_tokens
        return [row[:cap] for row in ids], sum(len(row) > cap for row in ids)

    def _bos_embedding(self) -> Tensor:
        """(1, d_lm) BOS's input embedding, or (0, d_lm) for an LM without BOS (the embedded tiny Llama)."""
        return self._token_embeddings([self.bos_id] if self.bos_id is not None else [])

    def text_token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs before truncation, [EMB] (and BOS) included."""
        extra = 1 + (self.bos_id is not None)
        return [len(r) + extra for r in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def _embedding_row(self, ids: list[int]) -> list[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + ids + [self.emb_id]

    # ------------------------------------------------------------------ the shared LM call

    def _lm_states(self, rows: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One LM call over variable-length rows of input embeddings, right-padded.

        Returns the final (normed) hidden states (R, L, d_lm) and the attention mask (R, L).
        Padding is zeros and masked; right padding keeps positions 0..len−1 for every row.
        """
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=embeds.device)
        for i, r in enumerate(rows):
            mask[i, : r.shape[0]] = 1
        out = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        return out.last_hidden_state, mask

    def forward(
        self,
        pixels: Tensor,
        captions: Sequence[str],
        objective: str = "joint",
        boxes: Sequence[Tensor] | None = None,
        soft_prompts: bool | None = None,
    ) -> dict[str, Any]:
        """One training step's model outputs, for `vla.losses.mmgem_objective_loss`.

        ``objective``: ``joint`` (both paths), ``embed`` (InfoNCE path only) or ``caption``
        (generation path only) — the paper's ablation at the same budget. With ``boxes`` the
        captions are region captions, one per box in image order, and the image side of the
        InfoNCE is the region embedding h4(v).
        Returns ``image``, ``text`` (L2-normalised, embed/joint), ``logit_scale``, ``logits``
        (generation rows, (B, L, V)), ``targets`` (aligned with the inputs, ``IGNORE_INDEX`` on
        the prefix, the prompt and padding), and ``truncated`` (captions cut at max_text_tokens).
        ``soft_prompts``: the caption prompt, as in `caption_inputs`.
        """
        if objective not in ("joint", "embed", "caption"):
            raise UserError(f"objective {objective!r} is not one of joint, embed, caption")
        v = self.image_embedding(pixels, boxes)
        if v.shape[0] != len(captions):
            raise ValueError(f"{v.shape[0]} images/regions for {len(captions)} captions")
        ids, truncated = self.tokenize(captions)
        want_emb, want_gen = objective != "caption", objective != "embed"

        rows: list[Tensor] = []
        if want_emb:
            rows += [self._token_embeddings(self._embedding_row(r)) for r in ids]
        start = len(rows)
        if want_gen:
            bos, prefix = self._bos_embedding(), self.visual_prefix(v)
            prompt = self.prompt_embeddings(self._use_soft_prompts(boxes, soft_prompts))
            for b, r in enumerate(ids):
                rows.append(torch.cat([bos, prefix[b], prompt, self._token_embeddings(r + [self.eos_id])]))
        states, _ = self._lm_states(rows)

        out: dict[str, Any] = {"truncated": truncated, "logit_scale": self.logit_scale()}
        if want_emb:
            last = torch.tensor([len(self._embedding_row(r)) - 1 for r in ids], device=states.device)
            t = self.h2(states[torch.arange(len(ids), device=states.device), last])
            # regions are matched through h4 (stage-2 regional retrieval); V_in below stays h3(v)
            out["image"] = F.normalize(self.h4(v) if boxes is not None else v, dim=-1)
            out["text"] = F.normalize(t, dim=-1)
        if want_gen:
            head = bos.shape[0] + prefix.shape[1] + prompt.shape[0]
            gen_len = head + max(len(r) for r in ids) + 1
            out["logits"] = self.lm.get_output_embeddings()(states[start:, :gen_len])
            targets = torch.full((len(ids), gen_len), IGNORE_INDEX, dtype=torch.long, device=states.device)
            for b, r in enumerate(ids):
                targets[b, head : head + len(r) + 1] = torch.tensor(r + [self.eos_id], device=states.device)
            out["targets"] = targets
        return out

    def text_embedding(self, texts: Sequence[str]) -> Tensor:
        """t = h2(last state at [EMB]), unnormalised (N, D); texts cut at max_text_tokens."""
        ids, _ = self.tokenize(texts)
        states, _ = self._lm_states([self._token_embeddings(self._embedding_row(r)) for r in ids])
        last = torch.tensor([len(self._embedding_row(r)) - 1 for r in ids], device=states.device)
        return self.h2(states[torch.arange(len(ids), device=states.device), last])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the tower's blocks and the LM's decoder layers (see
        `MMGEMTrainer.set_grad_checkpointing`)."""
        from vla.models.mmgem.causal_lm import set_lm_checkpointing

        self.tower.visual.set_grad_checkpointing(enable)
        set_lm_checkpointing(self.lm, enable)

    # ------------------------------------------------------------------ what each phase trains

    def trainable_parameters(self, phase: str) -> dict[str, list[nn.Parameter]]:
        """Freeze all but what ``phase`` trains; returns the trained parameters by learning-rate group.

        - ``joint`` (stage 1): everything; ``projections`` (h1, h2, h3, logit scale; paper lr 5e-4)
          and ``backbones`` (vision tower and LM; paper lr 5e-5). h4 is not used in stage 1.
        - ``region-caption`` (stage 2): h3 and the soft prompts (split off the table).
        - ``region-retrieval`` (stage 2): h4 only.
        """
        self.requires_grad_(False)
        if phase == "joint":
            groups = {
                "projections": [*self.h1.parameters(), *self.h2.parameters(), *self.h3.parameters(),
                                *self.logit_scale.parameters()],
                "backbones": [*self.tower.parameters(), *self.lm.parameters()],
            }
        elif phase == "region-caption":
            groups = {"projections": [*self.h3.parameters(), self.split_soft_prompts()]}
        elif phase == "region-retrieval":
            groups = {"projections": [*self.h4.parameters()]}
        else:
            raise UserError(f"phase {phase!r} is not one of joint, region-caption, region-retrieval")
        for params in groups.values():
            for p in params:
                p.requires_grad_(True)
        return groups


@torch.no_grad()
def greedy_decode_without_cache(model: MMGEM, inputs_embeds: Tensor, max_new_tokens: int) -> list[list[int]]:
    """The naive reference: re-run the LM over the whole sequence for every new token, no cache.

    Same stopping rule as ``generate``: a sequence that wrote end of text is finished.
    """
    table = model.lm.get_input_embeddings()
    seq = inputs_embeds
    tokens = torch.empty(seq.shape[0], 0, dtype=torch.long, device=seq.device)
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    for _ in range(max_new_tokens):
        logits = model.lm(inputs_embeds=seq, use_cache=False).logits[:, -1]
        logits[:, model.mode_token_ids] = float("-inf")  # as `generate`'s suppress_tokens
        nxt = logits.argmax(dim=-1).masked_fill(done, model.eos_id)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == model.eos_id
        if done.all():
            break
        seq = torch.cat([seq, table(nxt)[:, None]], dim=1)
    return [until_eos(row, model.eos_id) for row in tokens.tolist()]
