"""Text embedders: the real MiniLM, a tiny random Qwen3 for pooling, offline failures."""

from __future__ import annotations

import json
import time

import pytest
import torch

from vla.errors import UserError
from vla.models.embedder import build_tiny_tokenizer, load_embedder, pool

TINY_TEXTS = ["a red circle", "a large blue square to the left of a green triangle", "x", "two yellow stars"]


@pytest.fixture(scope="module")
def minilm():
    return load_embedder("minilm")


@pytest.fixture(scope="module")
def tiny_qwen():
    return load_embedder("vla-tiny-qwen")


def test_minilm_similar_sentences_score_higher(minilm):
    emb = minilm.embed(
        ["A man is playing a guitar.", "Someone plays a musical instrument.", "Stock markets fell sharply today."]
    )
    assert emb.shape == (3, 384) and minilm.dim == 384 and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3
    assert (minilm.config.pooling, minilm.max_length) == ("mean", 256)
    assert json.loads(json.dumps(minilm.spec))["name"] == "minilm"
    # [CLS] hello world [SEP]; truncation at max_length is not counted
    assert minilm.token_counts(["hello world", "word " * 300]) == [4, 302]
    # a batch embeds each text as it would alone, and order survives length-sorted batching
    torch.testing.assert_close(minilm.embed(["Stock markets fell sharply today.", "hi"], batch_size=1)[0], emb[2])


def test_digest_is_stable_and_tracks_what_changes_embeddings(minilm):
    s = minilm.spec  # what an artifact stores; rebuilding from it gives the same identity
    rebuilt = load_embedder(s["name"], pooling=s["pooling"], instruction=s["instruction"], max_length=s["max_length"])
    assert rebuilt.digest() == minilm.digest()
    assert load_embedder("minilm", instruction="Retrieve images").digest() != minilm.digest()
    assert load_embedder("minilm", max_length=64).digest() != minilm.digest()


def test_pool_picks_the_right_token_with_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # state = its flat index
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1, 7]
    assert pool(hidden, left, "last").flatten().tolist() == [3, 7]
    assert pool(hidden, left, "cls").flatten().tolist() == [2, 4]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]
    mixed = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])  # one left-, one right-padded row
    assert pool(hidden, mixed, "last").flatten().tolist() == [3, 6]


def test_tiny_qwen_last_token_independent_of_padding_side(tiny_qwen):
    tokenizer = tiny_qwen.tokenizer
    assert tiny_qwen.config.pooling == "last" and tiny_qwen.dim == 32
    # what the tokenizer itself ends with (Qwen3-Embedding: <|endoftext|>) is pooled; nothing is
    # appended, and never the eos token <|im_end|>
    ids = tiny_qwen._encode(TINY_TEXTS, truncate=True)
    eot, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert tokenizer.eos_token == "<|im_end|>"
    assert all(x[-1] == eot and x[-2] != eot and im_end not in x for x in ids)
    assert ids == tokenizer(TINY_TEXTS)["input_ids"]
    assert tiny_qwen.token_counts(TINY_TEXTS) == [len(x) for x in ids]
    alone = torch.cat([tiny_qwen.embed([t]) for t in TINY_TEXTS])
    try:
        for side in ("left", "right"):
            tokenizer.padding_side = side
            torch.testing.assert_close(tiny_qwen.embed(TINY_TEXTS), alone, atol=1e-5, rtol=0)
    finally:
        tokenizer.padding_side = "left"
    assert torch.cdist(alone, alone).triu(1).max() > 0.1, "different texts must embed differently"


def _qwen3_embedding_dir(path):
    """A tiny Qwen3 saved as Qwen/Qwen3-Embedding-0.6B is laid out: config.json (Qwen3), and a
    Qwen2Tokenizer with eos <|im_end|>, pad <|endoftext|>, left padding and a tokenizer.json whose
    TemplateProcessing post-processor appends <|endoftext|>."""
    from vla.models.embedder import build_tiny_qwen

    model, tokenizer = build_tiny_qwen(seed=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    return path


def test_qwen3_embedding_layout_embeds_as_its_readme_does(tmp_path):
    """Loaded from disk like the real model (AutoTokenizer → Qwen2Tokenizer, AutoModel → Qwen3Model),
    vla's vector for a text is the one Qwen3-Embedding's README computes: tokenizer(texts,
    padding, truncation) → model → last_token_pool → normalize. Before the fix vla appended the
    eos token <|im_end|> after the tokenizer's own <|endoftext|> and pooled that."""
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    path = _qwen3_embedding_dir(tmp_path / "qwen3-embedding")
    emb = load_embedder(str(path), pooling="last", max_length=12)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.eos_token == "<|im_end|>"

    def last_token_pool(hidden, mask):  # Qwen3-Embedding README
        if mask[:, -1].sum() == mask.shape[0]:
            return hidden[:, -1]
        lengths = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0]), lengths]

    texts = TINY_TEXTS + ["a large blue square to the left of a green triangle " * 3]  # the last is truncated
    reference = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding, so positions match exactly
            batch = tokenizer([text], padding=True, truncation=True, max_length=12, return_tensors="pt")
            reference.append(F.normalize(last_token_pool(model(**batch).last_hidden_state,
                                                         batch["attention_mask"]), dim=-1))
    torch.testing.assert_close(emb.embed(texts), torch.cat(reference), atol=1e-5, rtol=0)
    assert emb.cache_identity()["tokenizer_ends_with"] == ["<|endoftext|>"]
    assert emb.token_counts(texts)[-1] > 12  # the truncated one is counted as such


def test_cache_identity_changes_with_what_decides_the_vector(tiny_qwen, monkeypatch):
    """The feature-cache key (digest of cache_identity) moves with pooling, instruction, max length
    and vla's embedding code version; rebuilding from the spec gives the same key."""
    import vla.models.embedder as embedder_module

    s = tiny_qwen.spec
    assert load_embedder(s["name"], pooling=s["pooling"], max_length=s["max_length"]).digest() == tiny_qwen.digest()
    others = [load_embedder("vla-tiny-qwen", pooling="mean"),
              load_embedder("vla-tiny-qwen", pooling="token:<|im_end|>"),
              load_embedder("vla-tiny-qwen", instruction="Retrieve the image"),
              load_embedder("vla-tiny-qwen", max_length=32)]
    digests = {tiny_qwen.digest(), *(e.digest() for e in others)}
    assert len(digests) == 5
    monkeypatch.setattr(embedder_module, "EMBED_CODE_VERSION", embedder_module.EMBED_CODE_VERSION + 1)
    assert load_embedder("vla-tiny-qwen").digest() not in digests


def test_token_pooling_appends_its_token_once_and_keeps_it_on_truncation():
    e = load_embedder("vla-tiny-qwen", pooling="token:<|im_end|>", max_length=8)
    im_end = e.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = e._encode(["x", "a large blue square to the left of a green triangle " * 4], truncate=True)
    assert [x[-1] for x in ids] == [im_end, im_end] and len(ids[1]) == 8
    assert all(x.count(im_end) == 1 for x in ids)


def test_tiny_tokenizer_is_deterministic():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a("a red circle")["input_ids"] == b("a red circle")["input_ids"]


@pytest.mark.parametrize("name", ["qwen", "Qwen/Qwen3-Embedding-0.6B"])
def test_hub_model_missing_offline_fails_fast(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"Qwen/Qwen3-Embedding-0.6B\) is not available offline.*HF_HOME"):
        load_embedder(name)
    assert time.perf_counter() - start < 1.0


def test_bad_pooling_and_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="pooling 'max'"):
        load_embedder("vla-tiny-qwen", pooling="max")
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        load_embedder("vla-tiny-qwen", pooling="token:<EMB>")
    with pytest.raises(UserError, match="no config.json"):
        load_embedder(str(tmp_path))
    with pytest.raises(UserError, match="not a text embedder"):
        load_embedder("clip-vit-l")


def test_the_causal_lm_loader_shares_the_embedders_offline_loading(tmp_path, monkeypatch):
    """Review D7: causal_lm repeated the embedder's loading lines (and used its private `_source`),
    without the refusal of pickled weights: a pickle in an --llm directory raised torch's error."""
    import datetime

    from vla.models.mmgem.causal_lm import build_tiny_llama, load_causal_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^Org/absent-lm \(Org/absent-lm\) is not available offline.*HF_HOME"):
        load_causal_lm("Org/absent-lm")
    with pytest.raises(UserError, match=r"^Org/absent-emb \(Org/absent-emb\) is not available offline.*HF_HOME"):
        load_embedder("Org/absent-emb", pooling="mean")
    model, tokenizer = build_tiny_llama(["a red circle", "a blue square"])
    lm = tmp_path / "lm"
    model.config.save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    torch.save({"when": datetime.datetime(2020, 1, 1)}, lm / "pytorch_model.bin")  # needs a global to load
    with pytest.raises(UserError, match=f"^{lm}: {lm} holds pickled weights that would run code") as err:
        load_causal_lm(str(lm))
    assert "weights_only" not in str(err.value)
