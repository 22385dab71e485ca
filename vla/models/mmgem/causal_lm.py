"""The causal language model MM-GEM reads and writes with, and its tokenizer.

- A real model: any transformers causal LM by hub id or directory (`tinyllama` → TinyLlama 1.1B,
  the paper's LM), loaded with ``AutoModelForCausalLM`` — offline from the local cache only.
- The embedded default: a tiny Llama-architecture LM built from a `LlamaConfig` with seeded random
  weights, and a byte-level BPE trained in-process on the given captions (the `tokenizers`
  library, milliseconds), wrapped as a transformers fast tokenizer so that ``save_pretrained``
  and ``AutoTokenizer.from_pretrained`` round-trip it. It is the same code path at a small size.

`add_mode_tokens` adds MM-GEM's special tokens to the tokenizer and grows the embedding table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from vla.errors import UserError
from vla.models.hf_load import load_pretrained, model_source

EMB_TOKEN = "[EMB]"
CAP_TOKEN = "[CAP]"
END_OF_TEXT = "<|endoftext|>"


def soft_prompt_tokens(n: int) -> list[str]:
    """``[CAP_1] … [CAP_n]``: the stage-2 region-captioning prompts replacing ``[CAP]``."""
    return [f"[CAP_{i}]" for i in range(1, n + 1)]


@dataclass(frozen=True)
class TinyLlamaSize:
    """The embedded default's LM: a Llama at a size a 2-core CPU trains in minutes."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE trained on ``captions``, as a transformers `PreTrainedTokenizerFast`.

    Byte-level: any text encodes (no unknown token), and decoding inverts encoding exactly.
    ``<|endoftext|>`` is end of caption and padding; there is no BOS (the visual prefix, or
    nothing, starts a sequence). Deterministic for given captions.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(captions), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def build_tiny_llama(
    captions: Iterable[str], size: TinyLlamaSize = TinyLlamaSize(), seed: int = 0
) -> tuple[torch.nn.Module, Any]:
    """The embedded default: (LlamaForCausalLM with seeded random weights, its trained tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_caption_tokenizer(captions, size.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_key_value_heads,
        max_position_embeddings=size.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def load_causal_lm(name: str, *, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from an alias, hub id or directory; UserError if not at hand."""
    from vla.models import registry

    alias = registry.alias(name)
    if alias is not None and alias.kind != "llm":
        raise UserError(f"{name} is a {alias.kind}, not a causal LM; pass e.g. tinyllama or a model directory")
    source = model_source(name, alias.target if alias else name)
    return load_pretrained(name, source, "AutoModelForCausalLM", dtype=dtype, what=" as a causal LM")


def add_mode_tokens(lm: torch.nn.Module, tokenizer: Any, extra: Sequence[str] = (), seed: int = 0) -> dict[str, int]:
    """Add ``[EMB]``, ``[CAP]`` and ``extra`` (the soft prompts) as special tokens; grow the table.

    Idempotent: tokens the tokenizer already has keep their ids and rows (a stage-1 artifact
    reloaded for stage 2 adds only the soft prompts). New rows are drawn from a normal with the
    old rows' mean and covariance (transformers' ``mean_resizing``), seeded, so that a new token
    starts as a typical embedding. Returns token → id.
    """
    wanted = [EMB_TOKEN, CAP_TOKEN, *extra]
    missing = [t for t in wanted if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if lm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # it explains mean_resizing at warning level on every call
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lm.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:  # Llama tokenizers have none; padding is masked, any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return {t: tokenizer.convert_tokens_to_ids(t) for t in wanted}


def check_mode_tokens(tokenizer: Any, tokens: Sequence[str] | Mapping[str, int], where: str) -> None:
    """Refuse a tokenizer that lacks special tokens an artifact recorded, or (given token → id, as
    `mmgem.json` records them) maps one to another id: the LM's rows for [EMB] and [CAP] would be
    read for the wrong mode (before any compute)."""
    vocab = tokenizer.get_vocab()
    absent = [t for t in tokens if t not in vocab]
    if absent:
        raise UserError(
            f"{where}: the tokenizer lacks {', '.join(absent)}, which this MM-GEM model was trained with; "
            "load the LM and tokenizer saved beside it (save_pretrained), not the base model"
        )
    if isinstance(tokens, Mapping):
        moved = [f"{t} is id {vocab[t]}, recorded {i}" for t, i in tokens.items() if vocab[t] != int(i)]
        if moved:
            raise UserError(
                f"{where}: the tokenizer's mode tokens are not the ids this MM-GEM model was trained with "
                f"({'; '.join(moved[:3])}); load the tokenizer saved beside it, unmodified, or re-export the model"
            )


def set_lm_checkpointing(lm: torch.nn.Module, enable: bool = True) -> None:
    """transformers' activation checkpointing of the decoder layers, non-reentrant (its
    ``activation_checkpointing_enable``, or ``gradient_checkpointing_enable`` before it existed)."""
    if hasattr(lm, "activation_checkpointing_enable"):
        if enable:
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.activation_checkpointing_disable()
    elif enable:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_disable()


def lm_checkpointing(lm: torch.nn.Module) -> bool:
    """Whether any of the LM's layers checkpoints its activations."""
    return any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())
