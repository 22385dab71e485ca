import pytest
import torch

from vla.cache import cache_dir_for, cached_features


def test_features_are_computed_once_and_keyed_by_model_and_data(tmp_path):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    keys, texts = ["a", "b", "c"], ["x", "yy", "zzz"]
    kw = dict(model_digest="m1", data_digest="d1", keys=keys, inputs=texts, encode=encode, batch_size=2)
    table, hit = cached_features(tmp_path, "phi.short", **kw)
    assert not hit and calls == [2, 1]
    assert table.lookup(["c", "a"]).tolist() == [[3.0, 1.0], [1.0, 1.0]]
    table, hit = cached_features(tmp_path, "phi.short", **kw)
    assert hit and calls == [2, 1]  # reused, not recomputed
    assert table.lookup(["b"]).tolist() == [[2.0, 1.0]]
    for change in ({"model_digest": "m2"}, {"data_digest": "d2"}, {"inputs": ["x", "yy", "other"]}):
        _, hit = cached_features(tmp_path, "phi.short", **{**kw, **change})
        assert not hit
    assert len(list(cache_dir_for(tmp_path).glob("*.npy"))) == 4


def test_interrupted_computation_leaves_no_entry(tmp_path):
    def failing(texts):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_features(tmp_path, "phi.long", model_digest="m", data_digest="d", keys=["a"], inputs=["x"],
                        encode=failing)
    assert not list(tmp_path.rglob("*.npy"))


def test_texts_are_encoded_in_length_sorted_batches_and_rows_keep_their_order(tmp_path):
    batches = []

    def encode(texts):
        batches.append(list(texts))
        return torch.tensor([[float(len(t))] for t in texts])

    texts = ["a" * n for n in (5, 1, 4, 2, 3)]
    keys = [f"k{i}" for i in range(len(texts))]
    table, _ = cached_features(tmp_path, "phi.long", model_digest="m", data_digest="d", keys=keys,
                               inputs=texts, encode=encode, batch_size=2)
    # each batch holds texts of neighbouring lengths (less padding) ...
    assert [[len(t) for t in b] for b in batches] == [[1, 2], [3, 4], [5]]
    # ... and every row is still the feature of its own key
    assert table.lookup(keys).flatten().tolist() == [5.0, 1.0, 4.0, 2.0, 3.0]
