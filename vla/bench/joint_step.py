"""Part g: one MM-GEM `joint-train` step with ONE shared LM forward vs two separate LM forwards.

The step is joint-train's (vla/stages/joint_train.py) built in-process: the small CLIP's image
tower and the embedded recipe's tiny Llama (its BPE trained on the batch's captions), the
`MMGEMTrainer` loss L = L_emb + L_gen, backward and an optimizer step. A quarter of the samples
train on their long caption, as in the embedded recipe. The two ways differ only in how the LM
sees a step's rows:

    shared     the [text, [EMB]] rows and the [V_in, [CAP], caption, eos] rows stacked along the
               batch, right-padded to one length: one LM call (what `MMGEM.forward` does)
    separate   the same rows as two LM calls, one per path, each padded to its own longest row
               (the straightforward way; the model's `_lm_states` is split for this part only)

No hidden state is shared in either way: the [EMB] rows must not see the image. What the one
call saves is a second pass over the LM's weights and its kernel launches; what it costs is the
shorter [EMB] rows padded to the caption rows' length. Both ways give the same loss (checked
here, and by tests/test_mmgem.py for the embeddings and logits).

The samples are rendered in memory by `vla synth`'s own generator; the batch is preprocessed once,
so the figure is the step's, not the data loader's. The LM's and tower's linears go through
oneDNN both ways, as the loop runs them on the CPU (`train.cpu_matmul=auto`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from vla.bench import Figure, Part, alternate

BATCH = 128
LONG_CAPTION_PROB = 0.25  # recipes/embedded/mmgem/joint-train.yaml
SEED = 0


def _samples(n: int) -> list:
    from vla.data.synth import SynthConfig, make_sample, sample_tasks

    cfg = SynthConfig(n_train=n, n_val=0, n_test=0, yolo_train=0, image_size=64)  # the CLIP's own size
    return [make_sample(task)[0] for task in sample_tasks(cfg)]


def _build(captions: list[str], quick: bool):
    import torch

    from vla.models.mmgem.causal_lm import TinyLlamaSize
    from vla.models.mmgem import MMGEMConfig, build_mmgem

    torch.manual_seed(SEED)
    if quick:  # the smoke recipe's sizes
        size = TinyLlamaSize(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
        return build_mmgem("vla-micro-clip", None, captions, MMGEMConfig(max_text_tokens=128), SEED, size)
    return build_mmgem("vla-tiny-clip", None, captions, MMGEMConfig(max_text_tokens=128), SEED, TinyLlamaSize())


@contextlib.contextmanager
def separate_lm_forwards(model, n_embedding_rows: int) -> Iterator[None]:
    """Within the block, `model`'s LM call runs as two calls: the first `n_embedding_rows` rows
    (the [EMB] rows) and the rest (the caption rows), each right-padded to its own longest row;
    the two outputs are zero-padded to one length and stacked as the one call would return them."""
    import torch
    import torch.nn.functional as F

    one_call = model._lm_states

    def two_calls(rows):
        parts = [one_call(rows[:n_embedding_rows]), one_call(rows[n_embedding_rows:])]
        length = max(states.shape[1] for states, _ in parts)
        states = torch.cat([F.pad(s, (0, 0, 0, length - s.shape[1])) for s, _ in parts])
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for _, m in parts])
        return states, mask

    model._lm_states = two_calls
    try:
        yield
    finally:
        del model._lm_states  # the instance attribute; the method is the class's again


def _trainer(model):
    from vla.losses import ClipLoss
    from vla.models.mmgem.objective import MMGEMTrainer

    return MMGEMTrainer(model, "joint", ClipLoss())


def train_steps(pixels, captions: list[str], steps: int, shared: bool, quick: bool) -> float:
    """Samples/s of `steps` joint-train steps (after one untimed warm-up step) on one batch."""
    import torch

    from vla.models.onednn_linear import onednn_linear

    model = _build(captions, quick).train()
    onednn_linear(model)  # as the training loop does on the CPU (train.cpu_matmul=auto)
    trainer = _trainer(model)
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-4)
    way = contextlib.nullcontext() if shared else separate_lm_forwards(model, len(captions))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        trainer(pixels, captions)["loss"].backward()
        optimizer.step()

    with way:
        step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * len(captions) / (time.perf_counter() - start)


def same_loss(pixels, captions: list[str], quick: bool) -> tuple[float, float]:
    """The joint loss of one model on one batch, through one LM call and through two."""
    import torch

    model = _build(captions, quick).eval()
    trainer = _trainer(model)
    with torch.no_grad():
        one = float(trainer(pixels, captions)["loss"])
        with separate_lm_forwards(model, len(captions)):
            two = float(trainer(pixels, captions)["loss"])
    return one, two


def run(quick: bool) -> Part:
    import torch

    from vla.stages.joint_train import caption_chooser

    batch = 8 if quick else BATCH
    steps = 2 if quick else 5
    samples = _samples(batch)
    choose = caption_chooser(SEED, LONG_CAPTION_PROB)
    captions = [choose(s) for s in samples]
    probe = _build(captions, quick)
    pixels = torch.stack([probe.preprocess(s.image) for s in samples])
    lengths = [len(r) for r in probe.tokenize(captions)[0]]

    one, two = same_loss(pixels, captions, quick)
    shared_runs, separate_runs = alternate(lambda: train_steps(pixels, captions, steps, True, quick),
                                           lambda: train_steps(pixels, captions, steps, False, quick),
                                           rounds=1 if quick else 2)
    shared, separate = max(shared_runs), max(separate_runs)
    part = Part("g", f"joint-train step (L_emb + L_gen), batch {batch}, {steps} steps",
                "two LM forwards per step ([EMB] rows, then caption rows)")
    part.figures = [Figure("joint-train step", "samples/s", shared, separate, shared / separate,
                           "vla / baseline", 1.0)]
    part.details = {"batch": batch, "steps": steps, "quick": quick, "kept": "best run per way",
                    "long_caption_prob": LONG_CAPTION_PROB, "caption_tokens_max": max(lengths),
                    "caption_tokens_mean": sum(lengths) / len(lengths),
                    "shared_samples_per_s": shared_runs, "separate_samples_per_s": separate_runs,
                    "loss_one_call": one, "loss_two_calls": two, "same_loss": abs(one - two) <= 1e-4 * max(1.0, abs(one)),
                    "hidden_states_shared": False,
                    "lm_calls_per_step": {"shared": 1, "separate": 2}}
    return part
