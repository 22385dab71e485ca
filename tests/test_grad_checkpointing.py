"""train.grad_checkpointing on the DCLIP student (open_clip's switch on its tower) and on
pretrain-lm's causal LM (transformers' switch): the loss and every gradient are unchanged.
(MM-GEM's tower + LM: tests/test_mmgem.py.)"""

from __future__ import annotations

import torch


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


def test_the_dclip_students_grad_checkpointing_keeps_loss_and_gradients() -> None:
    from vla.models.clip import load_clip
    from vla.models.dclip.student import ImageStudent

    student = ImageStudent(load_clip("vla-micro-clip").model.visual).train()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    loss = lambda: ((student(pixels) - target) ** 2).sum()  # noqa: E731
    plain = _grads(student, loss)
    student.set_grad_checkpointing(True)
    assert student.visual.transformer.grad_checkpointing
    _same(plain, _grads(student, loss))


def test_the_causal_lms_grad_checkpointing_keeps_loss_and_gradients() -> None:
    from vla.models.mmgem.causal_lm import build_tiny_llama, lm_checkpointing
    from vla.stages.pretrain_lm import CausalLMTrainer, _pad, _rows

    captions = ["a red circle on the left", "two blue squares", "a green star above a circle"]
    lm, tokenizer = build_tiny_llama(captions)
    trainer = CausalLMTrainer(lm).train()
    ids, mask = _pad(_rows(tokenizer, captions, 32), tokenizer.pad_token_id)
    loss = lambda: trainer(ids, mask)["loss"]  # noqa: E731
    plain = _grads(trainer, loss)
    trainer.set_grad_checkpointing(True)
    assert lm_checkpointing(lm)
    _same(plain, _grads(trainer, loss))
