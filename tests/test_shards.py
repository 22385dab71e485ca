"""Reading img2dataset-style shards and JSONL manifests: every corrupt-sample kind is skipped and
counted by reason, good samples read back field for field, broken files are clear errors."""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from vla.data.jsonl import iter_jsonl_samples
from vla.data.sample import Region, Sample
from vla.data.shards import ShardWriter, iter_samples, iter_shard_samples
from vla.data.skips import SkipCounter
from vla.data.stream import resolve_data
from vla.errors import StageError, UserError


def _image(w: int = 32, h: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A valid PNG that claims w x h pixels (its data is a few bytes): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


GOOD = [
    Sample("good0", _image(seed=1), ["a red square"]),
    Sample("good1", _image(40, 30, seed=2), ["a blue circle", "a round blue thing"],
           long_caption="a blue circle left of a red square on a grey background",
           regions=[Region((1.0, 2.0, 10.0, 12.0), "circle", "a blue circle", 0.9),
                    Region((0.0, 0.0, 40.0, 30.0), "scene")], label=3),
]
PNG = _encode(_image(16, 16, seed=3), "PNG")
HALF_JPEG = (lambda b: b[: len(b) // 2])(_encode(_image(128, 128, seed=4), "JPEG"))
# key -> (members, the reason it must be skipped for)
CORRUPT = {
    "c_missing_image": ({"txt": b"a caption", "json": b"{}"}, "missing_image"),
    "c_missing_caption": ({"png": PNG, "json": b'{"url": "http://x/1.png"}'}, "missing_caption"),
    "c_empty_file": ({"jpg": b"", "txt": b"a caption"}, "empty_file"),
    "c_random_bytes": ({"jpg": random.Random(0).randbytes(500), "txt": b"a caption"}, "undecodable_image"),
    "c_half_jpeg": ({"jpg": HALF_JPEG, "txt": b"a caption"}, "truncated_image"),
    "c_bomb_pil": ({"png": _png_header(20000, 20000), "txt": b"a caption"}, "decompression_bomb"),
    "c_bomb_ours": ({"png": _png_header(9000, 9000), "txt": b"a caption"}, "decompression_bomb"),
    "c_empty_txt": ({"png": PNG, "txt": b" \n"}, "empty_caption"),
    "c_latin1": ({"png": PNG, "txt": "café crème".encode("latin-1")}, "non_utf8_caption"),
    "c_box_out": ({"png": PNG, "txt": b"a caption",
                   "json": json.dumps({"regions": [{"box": [0, 0, 17, 8]}]}).encode()}, "box_outside_image"),
    "c_box_flat": ({"png": PNG, "txt": b"a caption",
                    "json": json.dumps({"regions": [{"box": [5, 0, 5, 8]}]}).encode()}, "box_outside_image"),
    "c_bad_json": ({"png": PNG, "txt": b"a caption", "json": b"{not json"}, "bad_json"),
}


def _write_mixed(out_dir) -> list:
    with ShardWriter(out_dir, maxcount=5, image_format="png") as w:
        w.write(GOOD[0])
        for key, (members, _) in CORRUPT.items():
            w.write_raw(key, members)
        w.write(GOOD[1])
    return w.shards


def _assert_same(got: Sample, want: Sample) -> None:
    assert (got.key, got.captions, got.long_caption, got.label) == (want.key, want.captions,
                                                                     want.long_caption, want.label)
    assert got.regions == want.regions
    assert got.image.mode == "RGB" and np.array_equal(np.asarray(got.image), np.asarray(want.image))


def test_good_samples_read_back_and_each_corrupt_kind_is_skipped_by_reason(tmp_path):
    shards = _write_mixed(tmp_path)
    assert len(shards) == 3
    skips = SkipCounter()
    got = list(iter_samples(shards, skips))
    assert [s.key for s in got] == ["good0", "good1"]
    for g, w in zip(got, GOOD):
        _assert_same(g, w)
    expected: dict[str, int] = {}
    for _, reason in CORRUPT.values():
        expected[reason] = expected.get(reason, 0) + 1
    # the first few skipped samples are named by shard and key, so a user can find them
    named = [f"{'00000' if i < 4 else '00001'}.tar key {key} ({reason})"
             for i, (key, (_, reason)) in enumerate(list(CORRUPT.items())[:5])]
    assert skips.as_dict() == {"seen": 2 + len(CORRUPT), "used": 2, "skipped": expected, "examples": named}


def test_a_plain_img2dataset_shard_reads(tmp_path):
    gray = Image.fromarray(np.arange(48 * 32, dtype=np.uint8).reshape(32, 48) % 251, mode="L")
    meta = {"url": "http://example.com/a.jpg", "key": "000000007", "status": "success", "error_message": None,
            "width": 48, "height": 32, "original_width": 480, "original_height": 320, "exif": "{}",
            "sha256": "ab" * 32}
    with ShardWriter(tmp_path) as w:
        w.write_raw("000000007", {"jpg": _encode(gray, "JPEG"), "txt": b"a photo of a cat",
                                  "json": json.dumps(meta).encode()})
    skips = SkipCounter()
    (s,) = iter_shard_samples(w.shards[0], skips)
    assert (s.key, s.captions, s.long_caption, s.regions, s.label) == (
        "000000007", ["a photo of a cat"], None, [], None)
    assert s.image.mode == "RGB" and s.image.size == (48, 32)
    assert s.meta["url"] == meta["url"] and s.meta["original_width"] == 480 and "key" not in s.meta
    assert skips.as_dict() == {"seen": 1, "used": 1, "skipped": {}}


def test_decode_false_reads_headers_only(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write_raw("half", {"jpg": HALF_JPEG, "txt": b"a caption"})
        w.write_raw("bomb", {"png": _png_header(9000, 9000), "txt": b"a caption"})
    skips = SkipCounter()
    got = list(iter_shard_samples(w.shards[0], skips, decode=False))
    # the cut JPEG's header is intact, so without decoding it passes; the bomb is caught by its header
    assert [s.key for s in got] == ["half"] and got[0].image.size == (128, 128)
    assert skips.as_dict()["skipped"] == {"decompression_bomb": 1}


def test_draft_decodes_a_jpeg_at_the_smallest_scale_keeping_the_size_and_scales_its_boxes(tmp_path):
    """`draft_size=64` decodes a 256x192 JPEG at 1/2 (128x96: 1/4 would leave 48 < 64 px) with
    every box scaled by the same factor and pixels close to a full decode resized; a PNG, an
    image already at most 64 px and a cut JPEG read as without draft (the cut one still skipped)."""
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (24, 32, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    big = Image.fromarray(smooth)  # 256 x 192, blocks of 8 px: little for the DCT scale to lose
    region = Region((16.0, 8.0, 200.0, 100.0), "thing", "a thing")
    samples = [Sample("jpg", big, ["a"], regions=[region]), Sample("small", _image(48, 40), ["b"])]
    with ShardWriter(tmp_path / "jpg", image_format="jpg") as w:
        for s in samples:
            w.write(s)
        w.write_raw("half", {"jpg": HALF_JPEG, "txt": b"a caption"})
    with ShardWriter(tmp_path / "png", image_format="png") as w:
        w.write(samples[0])
    skips = SkipCounter()
    full = {s.key: s for s in iter_shard_samples(w.shards[0], SkipCounter())}  # the PNG: lossless
    got = {s.key: s for shard in (tmp_path / "jpg").glob("*.tar")
           for s in iter_shard_samples(shard, skips, draft_size=64)}
    assert got["jpg"].image.size == (128, 96) and got["small"].image.size == (48, 40)
    assert got["jpg"].regions[0].box == (8.0, 4.0, 100.0, 50.0) and got["jpg"].regions[0].caption == "a thing"
    reference = np.asarray(full["jpg"].image.resize((128, 96), Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(got["jpg"].image, dtype=np.float32) - reference).mean() < 6
    assert skips.as_dict()["skipped"] == {"truncated_image": 1}
    png = next(iter_shard_samples(w.shards[0], SkipCounter(), draft_size=64))
    assert png.image.size == (256, 192) and png.regions == [region]


def test_a_truncated_or_non_tar_shard_is_a_user_error_naming_it(tmp_path):
    (shard,) = _write_mixed(tmp_path / "full")[:1]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name == "good0.png")
    cut = tmp_path / "00003.tar"
    cut.write_bytes(shard.read_bytes()[: member.offset_data + member.size // 2])
    size = cut.stat().st_size
    with pytest.raises(UserError, match=rf"00003\.tar is truncated \(tar ends mid-member at byte {size}\); "
                                        r"re-write or re-download that shard"):
        next(iter_shard_samples(cut, SkipCounter()))
    junk = tmp_path / "00004.tar"
    junk.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(UserError, match=r"00004\.tar is not a readable tar archive"):
        next(iter_shard_samples(junk, SkipCounter()))


def test_a_shard_cut_between_members_or_with_a_damaged_header_is_truncated(tmp_path):
    """Python's tarfile stops quietly at the end of the file or at a bad header, as if the archive
    ended there; without its end-of-archive blocks a shard is truncated, not shorter."""
    (shard,) = _write_mixed(tmp_path / "full")[:1]
    with tarfile.open(shard) as tar:
        third = tar.getmembers()[3].offset  # a header, at a 512-byte boundary
    data = shard.read_bytes()
    cut = tmp_path / "00005.tar"
    cut.write_bytes(data[:third])
    with pytest.raises(UserError, match=rf"00005\.tar is truncated \(it ends at byte {third}, after 1 sample, "
                                        r"without the tar end-of-archive blocks\)"):
        next(iter_shard_samples(cut, SkipCounter()))
    damaged = tmp_path / "00006.tar"
    damaged.write_bytes(data[:third] + b"\x01" * 512 + data[third + 512:])
    with pytest.raises(UserError, match=r"00006\.tar is truncated \(it has a damaged header at byte"):
        next(iter_shard_samples(damaged, SkipCounter()))


def test_skip_counter_merges_and_enforces_the_limit():
    a, b = SkipCounter(seen=600), SkipCounter()
    a.skipped.update(undecodable_image=250)
    b.add_counts({"seen": 400, "used": 238, "skipped": {"undecodable_image": 150, "empty_caption": 12}})
    a.merge(b)
    assert a.as_dict() == {"seen": 1000, "used": 588,
                           "skipped": {"empty_caption": 12, "undecodable_image": 400}}
    a.check(0.5, "data/x")  # 41% is within a 50% limit
    with pytest.raises(StageError) as err:
        a.check(0.05, "data/x")
    assert str(err.value) == ("412 of 1000 samples in data/x skipped (undecodable_image: 400, empty_caption: 12), "
                              "above data.max_skip_fraction=0.05; fix the data or raise the limit "
                              "(--set data.max_skip_fraction=0.42; a rerun resumes)")
    with pytest.raises(ValueError):
        a.skip("no_such_reason")


def test_jsonl_manifest_resolves_relative_paths_and_skips_bad_lines(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(_encode(GOOD[0].image, "PNG"))
    abs_b = tmp_path / "elsewhere" / "b.png"
    abs_b.parent.mkdir()
    abs_b.write_bytes(_encode(GOOD[1].image, "PNG"))
    g1 = GOOD[1]
    lines = [
        json.dumps({"image": "images/a.png", "caption": "a red square"}),
        "",
        json.dumps({"image": str(abs_b), "key": "good1", "captions": g1.captions, "long_caption": g1.long_caption,
                    "regions": [r.to_json() for r in g1.regions], "label": 3}),
        json.dumps({"image": "images/missing.png", "caption": "gone"}),
        "{broken",
        json.dumps({"image": "images/a.png", "caption": "   "}),
        json.dumps(["not", "an", "object"]),
    ]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    skips = SkipCounter()
    got = list(iter_jsonl_samples(manifest, skips))
    assert [s.key for s in got] == ["00000001", "good1"]
    _assert_same(got[1], g1)
    assert got[0].captions == ["a red square"] and np.array_equal(np.asarray(got[0].image), np.asarray(GOOD[0].image))
    assert skips.as_dict() == {"seen": 6, "used": 2,
                               "skipped": {"bad_json": 2, "empty_caption": 1, "missing_image": 1},
                               "examples": ["train.jsonl line 4 (missing_image)", "train.jsonl line 5 (bad_json)",
                                            "train.jsonl line 6 (empty_caption)", "train.jsonl line 7 (bad_json)"]}


def test_resolve_data_accepts_three_forms_and_digests_content(tmp_path):
    """The digest is cheap (names, sizes, modification times): a copy that keeps the times has
    the same digest, an edited file a new one."""
    shards = _write_mixed(tmp_path / "shards")
    assert resolve_data(tmp_path / "shards").files == tuple(shards)
    assert resolve_data(shards[1]).files == (shards[1],)
    (tmp_path / "m.jsonl").write_text("{}\n")
    assert resolve_data(tmp_path / "m.jsonl").kind == "jsonl"
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.txt").write_text("")
    for bad, said in (("empty", r"empty: no \*\.tar shards in this directory; point --data"),
                      ("missing", r"missing does not exist"),
                      ("m.txt", r"m.txt is neither a .tar shard nor a .jsonl manifest")):
        with pytest.raises(UserError, match=said):
            resolve_data(tmp_path / bad)

    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "shards", copy)
    digest = resolve_data(tmp_path / "shards").digest()
    assert len(digest) == 64 and resolve_data(copy).digest() == digest
    last = copy / shards[-1].name
    data = bytearray(last.read_bytes())
    data[600] ^= 1  # same name, same size: only the bytes differ
    (tmp_path / "edited").mkdir()
    shutil.copytree(copy, tmp_path / "edited" / "d")
    (tmp_path / "edited" / "d" / last.name).write_bytes(bytes(data))
    assert resolve_data(tmp_path / "edited" / "d").digest() != digest
