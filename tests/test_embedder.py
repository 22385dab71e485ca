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
    # end-of-text is appended (the tokenizer does not add it) and is what gets pooled
    ids = tiny_qwen._encode(TINY_TEXTS, truncate=True)
    assert all(x[-1] == tokenizer.eos_token_id for x in ids)
    assert tiny_qwen.token_counts(TINY_TEXTS) == [len(x) for x in ids]
    alone = torch.cat([tiny_qwen.embed([t]) for t in TINY_TEXTS])
    try:
        for side in ("left", "right"):
            tokenizer.padding_side = side
            torch.testing.assert_close(tiny_qwen.embed(TINY_TEXTS), alone, atol=1e-5, rtol=0)
    finally:
        tokenizer.padding_side = "left"
    assert torch.cdist(alone, alone).triu(1).max() > 0.1, "different texts must embed differently"


def test_tiny_qwen_truncation_keeps_end_of_text_and_instruction_counts():
    short = load_embedder("vla-tiny-qwen", max_length=8)
    long_text = "a large blue square to the left of a green triangle " * 4
    (ids,) = short._encode([long_text], truncate=True)
    assert len(ids) == 8 and ids[-1] == short.tokenizer.eos_token_id
    assert short.token_counts([long_text])[0] > 8
    instructed = load_embedder("vla-tiny-qwen", instruction="Find the image")
    assert instructed.token_counts(["x"])[0] > short.token_counts(["x"])[0]
    assert not torch.allclose(instructed.embed(["x"]), short.embed(["x"]))


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
