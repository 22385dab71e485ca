"""Frozen text embedders through transformers: one vector per text, pooled over the real tokens.

Pooling is a property of the embedder (docs/methods.md §1):
- `mean`: average of the hidden states under the attention mask (sentence-transformers, MiniLM);
- `last`: the state of the last token of what the tokenizer itself produces — for
  Qwen3-Embedding the `<|endoftext|>` its post-processor appends (not its `eos_token`,
  `<|im_end|>`), exactly as its README's `last_token_pool` and sentence-transformers'
  `lasttoken` pooling do. Nothing is appended: a tokenizer that ends texts with no special token
  is pooled at the last text token (as sentence-transformers does);
- `cls`: the state of the first real token (BERT's [CLS]);
- `token:<tok>`: `<tok>`'s state, `<tok>` appended unless the tokenizer already ends with it
  (for a tokenizer that does not add the token the model was trained to pool at, e.g. the first
  Qwen3-Embedding release: `token:<|endoftext|>`); truncation keeps its place.
Padding may be on either side: positions come from the attention mask, so a text embeds the same
whatever else is in its batch.

Qwen-style instructions: with `instruction` set, each text becomes
`Instruct: {instruction}\nQuery:{text}` (Qwen puts it on queries only; none by default).

Feature caches key an embedder by `cache_identity()`: its weights, tokenizer, pooling, the token
the tokenizer ends with, instruction, max length, dtype and `EMBED_CODE_VERSION`, so that any
change to how a text becomes a vector makes new entries instead of reusing stale ones.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from vla.errors import UserError
from vla.models import registry
from vla.models.hf_load import load_pretrained, local_files, model_source

#: the token cap when neither the alias, a recipe nor the model's sentence-transformers config sets one
DEFAULT_MAX_LENGTH = 512
#: bump whenever vla's own code changes what vector a text gets (tokenising, pooling, batching),
#: so cached features from older code are not reused. 2: `last` pools the tokenizer's own end
#: token instead of appending `eos_token`.
EMBED_CODE_VERSION = 2
_POOLINGS = ("mean", "last", "cls")


@dataclass
class EmbedderConfig:
    """The `embedder:` block of a stage's recipe."""

    name: str = "qwen"                      # registry alias, hub id or local path
    pooling: Optional[str] = None           # mean | last | cls | token:<tok>; default: the alias's
    instruction: Optional[str] = None       # prefix for queries (Qwen3-Embedding style)
    max_length: int = 512                   # tokens the embedder reads (long captions fit)
    batch_size: int = 64                    # for computing the cached features


def embedder_from_config(cfg: EmbedderConfig, device: str = "cpu") -> "TextEmbedder":
    return load_embedder(cfg.name, pooling=cfg.pooling, instruction=cfg.instruction,
                         max_length=cfg.max_length, device=device)


@dataclass(frozen=True)
class EmbedderSpec:
    name_or_path: str
    pooling: str
    instruction: str | None
    max_length: int
    normalize: bool = True


class TextEmbedder:
    """A transformers encoder or decoder turned into a sentence embedder (fp32 on the CPU out)."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Any, config: EmbedderSpec, files: Path | None):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.dim = int(model.config.hidden_size)
        self.max_length = config.max_length
        self._files = files
        self._digest: str | None = None
        self._tokenizer_end = tokenizer_end_tokens(tokenizer)
        self._pool_token = _pool_token_id(tokenizer, config.pooling, name)
        self._takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able; `load_embedder(spec["name"], pooling=…, instruction=…, max_length=…)` rebuilds it."""
        return {"name": self.name, **asdict(self.config)}

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, dim) float32 CPU embeddings, L2-normalised when the spec says so."""
        ids = self._encode(texts, truncate=True)
        # Length-sorted batches waste little on padding; the order is restored at the end.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.dim)
        from vla.models.onednn_linear import onednn_linears

        with torch.no_grad(), onednn_linears(self.model):  # fp32 CPU linears through oneDNN
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                out[chunk] = self._forward([ids[i] for i in chunk]).float().cpu()
        return F.normalize(out, dim=-1) if self.config.normalize else out

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text needs (instruction and special tokens included) before truncation."""
        return [len(x) for x in self._encode(texts, truncate=False)]

    def truncated(self, texts: Sequence[str]) -> int:
        """How many of `texts` `embed` cuts at max_length (it reads only their beginning)."""
        return sum(n > self.max_length for n in self.token_counts(texts))

    def cache_identity(self) -> dict[str, Any]:
        """Everything that decides the vector a text gets; feature caches key on its digest."""
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return {"code_version": EMBED_CODE_VERSION, **asdict(self.config), "dtype": dtype,
                "tokenizer_ends_with": self.tokenizer.convert_ids_to_tokens(self._tokenizer_end),
                "tokenizer": self._tokenizer_identity(), "weights": self._weights_identity()}

    def digest(self) -> str:
        """sha256 of `cache_identity()`: what feature caches and artifacts call this embedder."""
        if self._digest is None:
            self._digest = hashlib.sha256(json.dumps(self.cache_identity(), sort_keys=True).encode()).hexdigest()
        return self._digest

    def _tokenizer_identity(self) -> str | None:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer: its files are part of the weights identity
            return None
        # vocabulary, normaliser, pre- and post-processor; not the truncation/padding state that
        # each call sets on the backend
        state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        return "sha256:" + hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()

    def _weights_identity(self) -> str:
        if self._files is not None and self._files.parent.name == "snapshots":
            return f"revision:{self._files.name}"  # a hub cache snapshot is named by its commit
        h = hashlib.sha256()
        if self._files is not None:
            for path in sorted(p for p in self._files.rglob("*") if p.is_file()):
                h.update(path.relative_to(self._files).as_posix().encode())
                with path.open("rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
        else:  # built in-process: the weights themselves
            for key, tensor in self.model.state_dict().items():
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"sha256:{h.hexdigest()}"

    def _encode(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        """Token ids as the model reads them: the tokenizer's own special tokens (truncation keeps
        them), plus the `token:<tok>` pooling token when the tokenizer does not end with it."""
        if self.config.instruction:
            texts = [f"Instruct: {self.config.instruction}\nQuery:{t}" for t in texts]
        limit = self.max_length if truncate else None
        ids = self.tokenizer(list(texts), truncation=truncate, max_length=limit)["input_ids"]
        if self._pool_token is None:
            return ids
        tok = self._pool_token
        return [x if x and x[-1] == tok else x[: limit - 1 if limit else None] + [tok] for x in ids]

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        length = max(len(x) for x in batch)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self._pool_token or 0)
        left = self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, ids in enumerate(batch):
            span = slice(length - len(ids), length) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids)
            mask[row, span] = 1
        device = next(self.model.parameters()).device
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        if self._takes_positions:
            inputs["position_ids"] = ((mask.cumsum(1) - 1).clamp(min=0)).to(device)
        hidden = self.model(**inputs).last_hidden_state
        return pool(hidden, mask.to(device), self.config.pooling)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, D) states → (B, D) under a (B, L) attention mask padded on either side."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if pooling == "cls":
        index = mask.argmax(1)  # first real token
    else:  # last / token:<tok> — the pooled token is the last real one
        index = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def tokenizer_end_tokens(tokenizer: Any) -> list[int]:
    """The special tokens a tokenizer appends after a text by itself ([SEP] for BERT,
    `<|endoftext|>` for Qwen3-Embedding, none for GPT-2): its output minus the plain text's."""
    probe = "a b"
    full = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[start + len(plain):])
    return []


def _pool_token_id(tokenizer: Any, pooling: str, name: str) -> int | None:
    """The token `token:<tok>` pooling appends (when the tokenizer does not end with it); else none."""
    if not pooling.startswith("token:"):
        return None
    token = pooling.removeprefix("token:")
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise UserError(f"{name}: pooling token {token!r} is not in the tokenizer's vocabulary")
    return tid


def load_embedder(
    name: str,
    *,
    pooling: str | None = None,
    instruction: str | None = None,
    max_length: int | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
) -> TextEmbedder:
    """A frozen text embedder: an alias (`qwen`, `minilm`, `vla-tiny-qwen`), a hub id or a directory."""
    alias = registry.alias(name)
    if alias is not None and alias.kind != "embedder":
        raise UserError(f"{name} is a {alias.kind}, not a text embedder; pass e.g. --embedder qwen")
    target = alias.target if alias else name
    pooling = pooling or (alias.pooling if alias else None)
    _check_pooling(name, pooling)  # before any weights are read
    if target == "builtin:vla-tiny-qwen":
        model, tokenizer = build_tiny_qwen()
        files = None
    else:
        source = model_source(name, target)
        model, tokenizer = load_pretrained(name, source, "AutoModel", trust_remote_code=trust_remote_code)
        files = local_files(source)
        pooling = pooling or _sentence_transformers_pooling(files)
    if pooling is None:
        raise UserError(f"{name}: pooling unknown; pass --pooling mean|last|cls|token:<tok>")
    limit = max_length or (alias.max_length if alias else None) or _sentence_transformers_max_length(files)
    limit = min(limit or DEFAULT_MAX_LENGTH, getattr(model.config, "max_position_embeddings", None) or 1 << 30)
    config = EmbedderSpec(target, pooling, instruction, int(limit))
    return TextEmbedder(name, model.to(device), tokenizer, config, files)


def _check_pooling(name: str, pooling: str | None) -> None:
    if pooling is not None and pooling not in _POOLINGS and not pooling.startswith("token:"):
        raise UserError(f"{name}: pooling {pooling!r} is not one of mean, last, cls, token:<tok>")


def _sentence_transformers_config(files: Path | None, filename: str) -> dict[str, Any]:
    if files is None or not (files / filename).is_file():
        return {}
    return json.loads((files / filename).read_text())


def _sentence_transformers_pooling(files: Path | None) -> str | None:
    """A sentence-transformers model says its pooling in 1_Pooling/config.json."""
    cfg = _sentence_transformers_config(files, "1_Pooling/config.json")
    modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
    return next((mode for key, mode in modes.items() if cfg.get(key)), None)


def _sentence_transformers_max_length(files: Path | None) -> int | None:
    return _sentence_transformers_config(files, "sentence_bert_config.json").get("max_seq_length")


# --- vla-tiny-qwen: a real Qwen3 code path with random weights, for tests ------------------------

_TINY_CORPUS = [
    "a small red circle on a white background",
    "a large blue square to the left of a green triangle",
    "two yellow stars above a purple rectangle on a grey background",
    "the orange circle is below the big black square",
    "three shapes: a red triangle, a blue circle and a green square",
]


#: Qwen3-Embedding's special tokens: `<|endoftext|>` is its pad token and the token its
#: tokenizer.json post-processor appends to every text (the model pools there); `<|im_end|>` is
#: its `eos_token` (a chat-turn end, never appended by the tokenizer).
QWEN_END_OF_TEXT, QWEN_IM_START, QWEN_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"


def build_tiny_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE trained in-process on a fixed corpus (deterministic, milliseconds), set up
    as Qwen3-Embedding-0.6B's tokenizer is: the same special tokens, eos `<|im_end|>`, pad
    `<|endoftext|>`, a TemplateProcessing post-processor appending `<|endoftext|>`, left padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = [QWEN_END_OF_TEXT, QWEN_IM_START, QWEN_IM_END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer)
    eot = (QWEN_END_OF_TEXT, bpe.token_to_id(QWEN_END_OF_TEXT))
    bpe.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"$A:0 {eot[0]}:0", pair=f"$A:0 {eot[0]}:0 $B:1 {eot[0]}:1",
                                      special_tokens=[eot]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=QWEN_IM_END, pad_token=QWEN_END_OF_TEXT,
                                   additional_special_tokens=[QWEN_IM_START], padding_side="left")


def build_tiny_qwen(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """Qwen3 (hidden 32, 2 layers) with seeded random weights, and its Qwen3-Embedding-like tokenizer."""
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tokenizer.pad_token_id,  # as Qwen3's config: both special ids set
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
        torch.manual_seed(seed)
        model = Qwen3Model(config)
    return model, tokenizer
