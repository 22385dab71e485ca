"""The caption side of the stages that fill the feature cache holds no texts: its peak memory
does not grow with the number of captions (issue #10 item 5). Before, `read_captions` kept every
key, caption, long caption and origin of the data in Python lists on every rank."""

from __future__ import annotations

import gc
import json
import tracemalloc

import torch

from vla.data.captions import read_captions

DIM = 4


class _FakeText:
    """A frozen text encoder for the test: a constant vector per text, tokens = words."""

    def __init__(self, name: str):
        self.name, self.model, self.max_length, self.text_context_length = name, None, 64, 77

    def digest(self) -> str:
        return self.name

    def embed(self, texts):
        return torch.ones(len(texts), DIM)

    encode_text = embed

    def truncated(self, texts) -> int:
        return sum(len(t.split()) > self.max_length for t in texts)

    def text_token_counts(self, texts):
        return [len(t.split()) + 2 for t in texts]


def _data(root, n: int):
    """A JSONL manifest of n samples with three short captions and a long one each (a manifest
    rather than shards: the same streams, without a tar header parse per sample per pass)."""
    root.mkdir()
    (root / "img.png").write_bytes(b"x")  # a stub: reading captions never opens an image
    with open(root / "data.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"key": f"{i:07d}", "image": "img.png",
                                "captions": [f"caption {j} of sample {i:07d} " + "word " * 6 for j in range(3)],
                                "long_caption": f"the long caption of sample {i:07d} " + "detail " * 80}) + "\n")
    return root / "data.jsonl"


def _caption_side(data, cache, monkeypatch):
    """What distill and contrast-tune do before training: read the captions, fill every cache
    column they train on (distill's short + long variants for Φ and the teacher, contrast-tune's
    caption and long-caption columns), count truncation."""
    from vla.stages.contrast_tune import embedder_truncated, phi_columns
    from vla.stages.distill import frozen_text_features, text_variants, truncation

    monkeypatch.setenv("VLA_CACHE_DIR", str(cache))
    phi, teacher = _FakeText("phi"), _FakeText("teacher")
    captions, _ = read_captions(data, max_skip_fraction=0.0)
    variants = text_variants(captions, "long_caption")
    feats = frozen_text_features("digest", variants, teacher, "teacher", phi, batch_size=64)
    counts = truncation(variants, teacher, phi)
    columns = phi_columns(captions, phi, "digest", 64, None)
    counts["contrast"] = embedder_truncated(captions, phi, long=True)
    return captions.count, {k: len(v) for k, v in feats.items()}, sorted(columns), counts


def _peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_caption_side_peak_memory_is_flat_in_the_number_of_captions(tmp_path, monkeypatch):
    import vla.cache
    import vla.data.captions

    # the constant-size buffers (encoding windows, index runs and merge blocks) small, so that
    # what remains is what would grow with the data
    for module, name in ((vla.cache, "WINDOW_ROWS"), (vla.cache, "RUN_ROWS"), (vla.cache, "BLOCK_ROWS"),
                         (vla.data.captions, "WINDOW")):
        monkeypatch.setattr(module, name, 256)
    small, large = 300, 2400
    warm = _caption_side(_data(tmp_path / "warm", 50), tmp_path / "c0", monkeypatch)  # imports, first calls
    assert warm[0] == 50
    result = {}
    peaks = {n: _peak(lambda n=n: result.__setitem__(n, _caption_side(
        _data(tmp_path / f"d{n}", n), tmp_path / f"c{n}", monkeypatch))) for n in (small, large)}
    count, rows, columns, counts = result[large]
    assert count == large and set(rows.values()) == {large} and columns == [-1, 0, 1, 2]
    assert counts["teacher_truncated"]["second"] == large  # the long caption is 60+ words
    # eight times the captions (≈ 5 MB more text, which the old table held): under 0.5 MB more
    assert peaks[large] - peaks[small] < 512 * 1024, {n: f"{p / 2**20:.2f} MB" for n, p in peaks.items()}
