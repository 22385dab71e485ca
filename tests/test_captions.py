"""Reading a data set's captions for the frozen text encoders: text members only, never an image."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from vla.data.captions import read_captions, text_windows
from vla.data.sample import Sample
from vla.data.shards import ShardWriter


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write(tmp_path):
    with ShardWriter(tmp_path / "shards", maxcount=3, image_format="png") as w:
        w.write(Sample("a", Image.new("RGB", (8, 8)), ["a red circle", "a small red circle"], long_caption="long a"))
        w.write(Sample("b", Image.new("RGB", (8, 8)), ["a blue square"]))
        w.write_raw("c", {"png": _png(), "txt": b" "})                         # empty caption: skipped
        w.write_raw("d", {"png": b"not an image at all", "txt": b"a green star"})  # read: image unchecked
        w.write_raw("e", {"txt": b"no image"})                                   # missing image: skipped
        w.write_raw("f", {"png": _png(), "txt": b"x", "json": b"{broken"})        # bad json: skipped
    (tmp_path / "m.jsonl").write_text("\n".join([
        json.dumps({"image": "img.png", "captions": ["one", "two"], "long_caption": "long one"}),
        json.dumps({"image": "absent.png", "caption": "gone"}),
        "not json",
    ]) + "\n")
    (tmp_path / "img.png").write_bytes(_png())
    return tmp_path


def test_captions_are_read_without_opening_a_single_image(tmp_path, monkeypatch):
    """Before, `read_captions` went through PIL for every sample (header read at least)."""
    root = _write(tmp_path)

    def no_images(*_args, **_kwargs):
        raise AssertionError("an image was opened to read a caption")

    monkeypatch.setattr(Image, "open", no_images)
    captions, skips = read_captions(root / "shards", max_skip_fraction=1.0)
    assert [r[1:] for r in captions.records()] == [
        ("a", ["a red circle", "a small red circle"], "long a"), ("b", ["a blue square"], None),
        ("d", ["a green star"], None)]
    assert (captions.count, captions.max_captions, captions.long_count) == (3, 2, 1)
    assert skips == {"seen": 6, "used": 3,
                     "skipped": {"empty_caption": 1, "missing_image": 1, "bad_json": 1}}
    manifest, skips = read_captions(root / "m.jsonl", max_skip_fraction=1.0)
    assert [r[1:] for r in manifest.records()] == [("00000001", ["one", "two"], "long one")]
    assert skips["skipped"] == {"missing_image": 1, "bad_json": 1}


def test_caption_columns_and_variants(tmp_path):
    captions, _ = read_captions(_write(tmp_path) / "shards", max_skip_fraction=1.0)
    shard = str(tmp_path / "shards" / "00000.tar")
    assert list(captions.short()) == [("a", "a red circle", shard), ("b", "a blue square", shard),
                                      ("d", "a green star", shard.replace("00000", "00001"))]
    name, rows = captions.caption_column(1)
    assert (name, [r[:2] for r in rows()]) == ("caption2", [("a", "a small red circle")])
    assert [r[:2] for r in captions.long_column()()] == [("a", "long a")]
    # distill's second text: the second caption / long caption, else the first
    name, rows = captions.variant("caption")
    assert (name, [r[1] for r in rows()]) == ("caption2", ["a small red circle", "a blue square", "a green star"])
    assert [r[1] for r in captions.variant("long_caption")[1]()] == ["long a", "a blue square", "a green star"]
    assert list(text_windows(captions.short, 2)) == [["a red circle", "a blue square"], ["a green star"]]


def test_too_many_bad_captions_stop_with_the_data_named(tmp_path):
    from vla.errors import StageError, UserError

    with pytest.raises((StageError, UserError), match="shards"):
        read_captions(_write(tmp_path) / "shards", max_skip_fraction=0.1)
