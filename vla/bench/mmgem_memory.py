"""MM-GEM's real-recipe memory, estimated from a measured per-sample activation figure.

    python -m vla.bench.mmgem_memory [--vision ViT-L-14] [--batch 256] [--stage joint-train|stage2-roi|both]
                                     [--out bench/mmgem_memory.json]

Builds the real architectures at random init (open_clip's ``ViT-L-14`` config, ``pretrained=None``;
a Llama with TinyLlama 1.1B's config) as `MMGEMTrainer` trains them in `joint-train`, and runs the
joint step's forward (both row kinds through the one LM call, L_emb and L_gen) at batch 1 and 2
with every caption at the recipe's ``max_text_tokens`` (the longest rows). What is measured: the
bytes of the distinct tensors autograd saves for the backward pass (`saved_tensors_hooks`, storages
counted once), i.e. the activation memory a step holds at the end of its forward; the per-sample
figure is S(2) − S(1), so weights (saved by reference) cancel. With ``--grad-checkpointing`` the
tower's blocks and the LM's layers save only their inputs.

Stage 2 (``--stage stage2-roi``) is measured the same way on its step as `stage2-roi` runs it: the
model gets the recipe's 64 soft prompts, only h3, the prompts and h4 train (objective joint: a
region caption row through the frozen LM, regional InfoNCE against the region caption's frozen
``t``), optionally with the image-caption rows (``image_captions``); one box per image.

The estimate per GPU = per-sample activations × batch + weights, gradients and the optimizer state
(fp32 master weights, fp32 gradients, LAMB's two fp32 moments: 16 bytes per trained parameter)
+ 4 bytes per frozen parameter (stage 2's tower and LM, kept in fp32).
Activations are measured in fp32 on the CPU (no GPU here); bf16 autocast stores most of them at
half the size, so the fp32 figure is the conservative one and half of it the optimistic one; both
are written. Not counted: transient buffers of the backward pass, allocator fragmentation, the
CUDA context (~1 GB), DDP's gradient buckets (one more copy of the gradients in the worst case).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
GIB = 2 ** 30


def saved_bytes(fn, checkpointed: list[torch.nn.Module] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs, plus the inputs
    of the `checkpointed` modules (what a checkpoint keeps: its own hooks hide it from ours)."""
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())

    def pack(t: torch.Tensor):
        keep(t)
        return t

    def pre_hook(module, args, kwargs):
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                keep(a)

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in checkpointed]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for h in handles:
            h.remove()
    return sum(seen.values())


def build(vision: str, max_text_tokens: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vla.losses import ClipLoss
    from vla.models.mmgem.causal_lm import train_caption_tokenizer
    from vla.models.clip import load_clip
    from vla.models.mmgem import MMGEM, MMGEMConfig
    from vla.models.mmgem.objective import MMGEMTrainer

    clip = load_clip(vision).model  # an open_clip architecture name without a tag: random init
    words = "a red blue small large circle square star on in left right of and the above below".split()
    tokenizer = train_caption_tokenizer([" ".join(words[i:] + words[:i]) for i in range(len(words))], 300)
    lm = LlamaForCausalLM(LlamaConfig(**{**TINYLLAMA, "pad_token_id": tokenizer.pad_token_id}))
    model = MMGEM(clip.visual, lm, tokenizer, MMGEMConfig(max_text_tokens=max_text_tokens))
    model.trainable_parameters("joint")
    caption = " ".join(words * 20)  # far past max_text_tokens: every row is the longest
    return MMGEMTrainer(model, "joint", ClipLoss()).train(), caption, clip.visual.image_size


def stage2(trainer, soft_prompts: int):
    """`trainer` as `stage2-roi` runs it: soft prompts added, only h3, the prompts and h4 trained,
    the frozen model in eval mode (the LM in training mode under checkpointing, as the stage does)."""
    from vla.models.mmgem.objective import MMGEMTrainer

    model = trainer.model
    model.add_soft_prompts(soft_prompts)
    params = [p for phase in ("region-caption", "region-retrieval")
              for ps in model.trainable_parameters(phase).values() for p in ps]
    for p in params:
        p.requires_grad_(True)
    model.eval()
    return MMGEMTrainer(model, "joint", trainer.contrastive)


def measure(vision: str = "ViT-L-14", max_text_tokens: int = 50, grad_checkpointing: bool = False,
            stage: str = "joint-train", soft_prompts: int = 64, image_captions: bool = False) -> dict:
    torch.manual_seed(0)
    trainer, caption, size = build(vision, max_text_tokens)
    if stage == "stage2-roi":
        trainer = stage2(trainer, soft_prompts)
    trainer.set_grad_checkpointing(grad_checkpointing)
    side = size if isinstance(size, int) else size[0]
    model = trainer.model
    if stage == "stage2-roi" and grad_checkpointing:
        model.lm.train()  # transformers checkpoints only in training mode (`lm_train_mode_for_checkpointing`)
    blocks = [*model.tower.visual.transformer.resblocks, *model.lm.model.layers] if grad_checkpointing else []
    by_batch = {}
    for b in (1, 2):
        pixels = torch.randn(b, 3, side, side)
        if stage == "stage2-roi":
            boxes = [torch.tensor([[side * 0.25, side * 0.25, side * 0.75, side * 0.75]])] * b
            kw = {"boxes": boxes, "image_captions": [caption] * b if image_captions else None}
        else:
            kw = {}
        by_batch[b] = saved_bytes(lambda: trainer(pixels, [caption] * b, **kw)["loss"], blocks)
    params = sum(p.numel() for p in trainer.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in trainer.parameters() if not p.requires_grad)
    out = {"stage": stage, "vision": vision, "lm": "Llama, TinyLlama 1.1B's config", "max_text_tokens": max_text_tokens,
           "grad_checkpointing": grad_checkpointing, "saved_bytes": by_batch,
           "activation_bytes_per_sample_fp32": by_batch[2] - by_batch[1], "trained_parameters": params,
           "frozen_parameters": frozen}
    if stage == "stage2-roi":
        out.update(soft_prompts=soft_prompts, image_captions=image_captions)
    return out


def estimate(m: dict, batch: int) -> dict:
    per = m["activation_bytes_per_sample_fp32"]
    states = 16 * m["trained_parameters"] + 4 * m.get("frozen_parameters", 0)
    return {"batch_per_gpu": batch, "weights_grads_lamb_gib": states / GIB,
            "activations_fp32_gib": per * batch / GIB, "activations_bf16_half_gib": per * batch / 2 / GIB,
            "peak_gib_conservative": (states + per * batch) / GIB,
            "peak_gib_bf16_half": (states + per * batch / 2) / GIB}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vla.bench.mmgem_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--vision", default="ViT-L-14")
    parser.add_argument("--max-text-tokens", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256, help="the recipe's per-GPU batch")
    parser.add_argument("--stage", choices=["joint-train", "stage2-roi", "both"], default="both")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both",
                        help="measure with train.grad_checkpointing off and on, or one of them")
    parser.add_argument("--out", type=Path, default=Path("bench/mmgem_memory.json"))
    args = parser.parse_args(argv)
    ckpts = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    runs = [(stage, ckpt, img) for stage in (["joint-train", "stage2-roi"] if args.stage == "both" else [args.stage])
            for ckpt in ckpts for img in ((False, True) if stage == "stage2-roi" else (False,))]
    for stage, ckpt, img in runs:
        m = measure(args.vision, args.max_text_tokens, ckpt, stage=stage, image_captions=img)
        rows.append({**m, "estimate": estimate(m, args.batch)})
        e = rows[-1]["estimate"]
        print(f"{stage}: {args.vision} + TinyLlama, grad_checkpointing={ckpt}"
              f"{', image_captions' if img else ''}: "
              f"{m['activation_bytes_per_sample_fp32'] / 2 ** 20:.1f} MiB/sample activations (fp32); "
              f"at {args.batch}/GPU: {e['peak_gib_conservative']:.1f} GiB (fp32 activations), "
              f"{e['peak_gib_bf16_half']:.1f} GiB (bf16 = half)", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")  # after each row: a long run keeps what it measured


if __name__ == "__main__":
    main()
