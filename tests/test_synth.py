"""The embedded synthetic world: determinism, exact boxes, the long-text property, layouts."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vla.data.synth import SHAPES, SynthConfig, generate_world, sample_tasks, make_sample
from vla.data.synth_text import BACKGROUNDS, CELLS, CLASSNAMES, COLOURS, PATTERNS, TEMPLATES
from vla.errors import UserError

CFG = SynthConfig(n_train=200, n_val=40, n_test=100, shard_size=64, yolo_train=60, workers=1)


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, in tar order."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.rsplit(".", 1)
            samples[key][ext] = tar.extractfile(m).read()
    return dict(samples)


def read_dir(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(path.glob("*.tar")):
        out.update(read_tar(shard))
    return out


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, generate_world(out, CFG)


def test_same_seed_is_byte_identical_whatever_the_workers_and_other_seeds_differ(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    again.mkdir()
    generate_world(again, replace(CFG, workers=2))
    assert digests(again) == digests(out)

    other = tmp_path / "other"
    other.mkdir()
    generate_world(other, replace(CFG, seed=1, n_train=20, n_val=5, n_test=10))
    first = (out / "train" / "00000.tar").read_bytes()
    assert (other / "train" / "00000.tar").read_bytes() != first
    a, b = read_tar(out / "train" / "00000.tar"), read_tar(other / "train" / "00000.tar")
    assert [a[k]["txt"] for k in list(b)[:10]] != [b[k]["txt"] for k in list(b)[:10]]


def test_split_shards_hold_complete_samples(world):
    out, result = world
    assert result["counts"]["train"] == 200 and result["counts"]["test"] == 100
    assert len(list((out / "train").glob("*.tar"))) == math.ceil(200 / CFG.shard_size)
    train = read_dir(out / "train")
    assert list(train) == [f"train{i:07d}" for i in range(200)]
    for key, members in list(train.items())[:20]:
        assert set(members) == {"jpg", "txt", "json"}
        meta = json.loads(members["json"])
        assert meta["key"] == key and meta["width"] == meta["height"] == CFG.image_size
        assert members["txt"].decode() == meta["caption"] == meta["captions"][0]
        assert len(set(meta["captions"])) == CFG.captions_per_image
        primary = meta["regions"][0]["label"]
        assert CLASSNAMES[meta["label"]] == primary and all(primary in c for c in meta["captions"])
        assert meta["background"] in meta["long_caption"]
        for r in meta["regions"]:  # the long caption names every object with its size and place
            assert r["caption"].split(" in the ")[0][2:] in meta["long_caption"]


def test_boxes_are_exact_and_tight():
    # Geometry alone: fill patterns off (contrast 0), so a pixel's colour says whose it is.
    cfg = replace(CFG, n_train=60, n_val=0, pattern_contrast=0)
    cell = cfg.image_size / 3
    checked = 0
    for task in list(sample_tasks(cfg))[:60]:
        sample, objects = make_sample(task)
        img = np.asarray(sample.image, dtype=np.float32)
        bg = np.asarray(BACKGROUNDS[task.scene.background], dtype=np.float32)
        for obj, region in zip(objects, sample.regions):
            x0, y0, x1, y1 = (int(v) for v in region.box)
            assert region.box == (x0, y0, x1, y1) and 0 <= x0 < x1 <= cfg.image_size and 0 <= y0 < y1
            # the region caption says what the crop shows, never where the object is
            assert region.label == obj.name and region.caption == f"a {obj.size} {obj.pattern} {obj.name}"
            assert not any(cell in region.caption for cell in CELLS)
            # Pixels nearer the object's colour than the background's, inside its own grid cell
            # (objects never leave their cell, so no other object can be there).
            row, col = divmod(obj.cell, 3)
            cy0, cy1 = math.ceil(row * cell), math.floor((row + 1) * cell)
            cx0, cx1 = math.ceil(col * cell), math.floor((col + 1) * cell)
            assert cx0 <= x0 and x1 <= cx1 and cy0 <= y0 and y1 <= cy1
            window = img[cy0:cy1, cx0:cx1]
            colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
            near = np.abs(window - colour).max(-1) < np.abs(window - bg).max(-1)
            ys, xs = np.nonzero(near)
            found = (cx0 + xs.min(), cy0 + ys.min(), cx0 + xs.max() + 1, cy0 + ys.max() + 1)
            assert np.abs(np.subtract(found, (x0, y0, x1, y1))).max() <= 1, (obj, found, region.box)
            # The box's interior is mostly the object's colour (not just an edge case).
            inside = np.abs(img[y0:y1, x0:x1] - colour).max(-1) < 40
            assert inside.mean() > 0.3
            checked += 1
    assert checked > 100


def test_long_text_property(world):
    out, result = world
    m = result["metrics"]
    assert m["long_text_prefix_ambiguous_fraction"] >= 0.5
    assert m["long_text_full_unique_fraction"] == 1.0
    assert m["short_caption_truncated_fraction"] == 0  # every template fits 14 BPE tokens for every word
    assert m["long_caption_truncated_fraction"] == 1.0
    assert m["short_caption_mean_tokens"] <= CFG.context_length < 2 * CFG.context_length < m["long_caption_mean_tokens"]
    longs = [json.loads(s["json"])["long_caption"] for s in read_dir(out / "test").values()]
    assert len(set(longs)) == len(longs) == CFG.n_test


def test_eval_sets_follow_the_clip_benchmark_layout(world):
    out, result = world
    test_keys = list(read_dir(out / "test"))
    expected_members = {"retrieval": {"jpg", "txt", "json"}, "long_retrieval": {"jpg", "txt", "json"},
                        "zeroshot": {"jpg", "cls", "json"}, "regional": {"jpg", "txt", "json"},
                        "captioning": {"jpg", "txt", "json"}, "grounding": {"jpg", "txt", "json"}}
    retrieval_owner: dict[str, str] = {}
    for task, members in expected_members.items():
        root = out / "eval" / task
        info = json.loads((root / "info.json").read_text())
        samples = read_dir(root / "test")
        n_shards = math.ceil(len(samples) / CFG.shard_size)
        # what CLIP_benchmark's build_wds_dataset reads: test/nshards.txt, test/0.tar …, dataset_type.txt
        assert (root / "test" / "nshards.txt").read_text().strip() == str(n_shards)
        assert sorted(p.name for p in (root / "test").glob("*.tar")) == [f"{i}.tar" for i in range(n_shards)]
        if task == "grounding":  # vla's own task: CLIP_benchmark has no reader for it
            assert not (root / "dataset_type.txt").exists()
        else:
            assert (root / "dataset_type.txt").read_text().strip() == \
                ("classification" if task == "zeroshot" else "retrieval")
        assert info["task"] == task and info["n_images"] == len(samples)
        assert result["counts"]["eval"][task] == {k: v for k, v in info.items() if k != "task"}
        if task not in ("retrieval", "regional", "grounding"):
            assert info["n_images"] == CFG.n_test and list(samples) == test_keys
        else:
            assert set(samples) <= set(test_keys)
        n_texts = 0
        for key, s in samples.items():
            assert set(s) == members
            meta = json.loads(s["json"])
            if task == "zeroshot":
                assert int(s["cls"]) == meta["label"]
                continue
            lines = s["txt"].decode().split("\n")
            n_texts += len(lines)
            wanted = {"retrieval": meta["captions"], "captioning": meta["captions"],
                      "long_retrieval": [meta["long_caption"]], "grounding": meta["grounding_captions"],
                      "regional": [r["caption"] for r in meta["regions"]]}[task]
            if task == "retrieval":
                # a subset of its captions, none of which any other test image has
                assert lines and set(lines) <= set(wanted)
                for line in lines:
                    assert retrieval_owner.setdefault(line, key) == key
            else:
                assert lines == wanted
        assert n_texts == info["n_texts"] or task == "zeroshot"
    # what was dropped is exactly the captions another test image shares
    test_metas = [json.loads(s["json"]) for s in read_dir(out / "test").values()]
    all_captions = [c for meta in test_metas for c in meta.get("captions", [])]
    info = json.loads((out / "eval" / "retrieval" / "info.json").read_text())
    assert info["dropped_captions"] == len(all_captions) - info["n_texts"]
    assert info["n_images"] + info["dropped_images"] == CFG.n_test
    # regional: the first region of each region caption, in test order; no caption twice
    regional = [json.loads(s["json"]) for s in read_dir(out / "eval" / "regional" / "test").values()]
    kept = [r["caption"] for meta in regional for r in meta["regions"]]
    first = list(dict.fromkeys(r["caption"] for meta in test_metas for r in meta["regions"]))
    info = json.loads((out / "eval" / "regional" / "info.json").read_text())
    assert kept == first and info["n_texts"] == len(kept)
    n_regions = sum(len(meta["regions"]) for meta in test_metas)
    assert info["dropped_regions"] == n_regions - len(kept) > 0
    assert info["n_images"] + info["dropped_images"] == CFG.n_test
    # grounding: every test image with two or more objects, each query naming its region's cell
    grounding = [json.loads(s["json"]) for s in read_dir(out / "eval" / "grounding" / "test").values()]
    assert len(grounding) == sum(len(meta["regions"]) >= 2 for meta in test_metas)
    for meta in grounding:
        for r, query in zip(meta["regions"], meta["grounding_captions"], strict=True):
            assert r["caption"] == query and query.split(" in the ")[1] in CELLS
    classnames = (out / "eval" / "zeroshot" / "classnames.txt").read_text().splitlines()
    assert classnames == sorted(classnames) == list(CLASSNAMES) and len(classnames) == len(COLOURS) * len(SHAPES)
    templates = (out / "eval" / "zeroshot" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == list(TEMPLATES) and len(templates) >= 6 and all("{c}" in t for t in templates)


def test_yolo_copy_matches_boxes_and_loads_in_ultralytics(world, tmp_path):
    out, result = world
    yolo = out / "yolo"
    assert result["counts"]["yolo_train"] == CFG.yolo_train and result["counts"]["yolo_val"] == CFG.n_val
    for split, n in (("train", CFG.yolo_train), ("val", CFG.n_val)):
        images = sorted((yolo / "images" / split).glob("*.jpg"))
        assert [p.stem for p in images] == [f"{split}{i:07d}" for i in range(n)]
        shards = read_dir(out / split)
        for img in images:
            meta = json.loads(shards[img.stem]["json"])
            assert img.read_bytes() == shards[img.stem]["jpg"]
            rows = [line.split() for line in (yolo / "labels" / split / f"{img.stem}.txt").read_text().splitlines()]
            assert len(rows) == len(meta["regions"])
            for row, r in zip(rows, meta["regions"]):
                x0, y0, x1, y1 = (v / CFG.image_size for v in r["box"])
                assert SHAPES[int(row[0])] == r["label"].split()[1]
                assert np.allclose([float(v) for v in row[1:]], [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0],
                                   atol=1e-6)

    # ultralytics' own dataset check, in a fresh process so its offline settings apply before import.
    config = tmp_path / "yolo-config"
    (config / "Ultralytics").mkdir(parents=True)
    import matplotlib
    font = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    shutil.copy(font, config / "Ultralytics" / "Arial.ttf")
    env = dict(os.environ, YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(config))
    code = ("import json, sys; from ultralytics.data.utils import check_det_dataset; "
            "d = check_det_dataset(sys.argv[1], autodownload=False); "
            "print(json.dumps({'nc': d['nc'], 'names': d['names'], 'train': d['train'], 'val': d['val']}))")
    proc = subprocess.run([sys.executable, "-c", code, str(yolo / "data.yaml")], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["nc"] == len(SHAPES) and list(data["names"].values()) == list(SHAPES)
    assert Path(data["train"]) == (yolo / "images" / "train").resolve()
    assert Path(data["val"]) == (yolo / "images" / "val").resolve()


def test_refuses_a_non_empty_directory_and_bad_settings(tmp_path):
    (tmp_path / "stale.txt").write_text("x")
    with pytest.raises(UserError, match="empty directory"):
        generate_world(tmp_path, CFG)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="max_objects"):
        generate_world(empty, replace(CFG, max_objects=10))
    with pytest.raises(UserError, match="captions_per_image"):
        generate_world(empty, replace(CFG, captions_per_image=99))


def test_fill_patterns_survive_in_a_crop_and_fade_in_the_64px_view():
    """A small object's fill pattern averages to its colour (a global colour is no hint), swings
    strongly in its crop resized to the CLIP's 64 px, and is mostly gone where the whole
    256 px image is resized to 64 px; the large object's coarser pattern stays partly visible."""
    from PIL import Image

    cfg = replace(CFG, n_train=60, n_val=0)
    swing: dict[str, list[tuple[float, float, float]]] = {"small": [], "large": []}
    offsets = []  # a window's mean minus the solid colour: off by the cut periods only
    for task in list(sample_tasks(cfg))[:60]:
        sample, objects = make_sample(task)
        img = np.asarray(sample.image, dtype=np.float32)
        view = np.asarray(sample.image.resize((64, 64), Image.BICUBIC), dtype=np.float32)
        for obj, region in zip(objects, sample.regions):
            if obj.shape not in ("square", "circle", "hexagon"):
                continue  # shapes whose middle fifth is all fill
            x0, y0, x1, y1 = region.box
            cx, cy, hw = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 5
            middle = img[int(cy - hw):int(cy + hw), int(cx - hw):int(cx + hw)].reshape(-1, 3)
            if obj.pattern == "solid":
                assert middle.std(0).max() == 0
                continue
            offsets.append(middle.mean(0) - COLOURS[obj.colour])
            crop = sample.image.crop((int(x0), int(y0), int(x1), int(y1))).resize((64, 64), Image.BICUBIC)
            in_crop = np.asarray(crop, dtype=np.float32)[20:44, 20:44].reshape(-1, 3)
            in_view = view[round((cy - hw) / 4):round((cy + hw) / 4), round((cx - hw) / 4):round((cx + hw) / 4)]
            swing[obj.size].append((middle.std(0).mean(), in_crop.std(0).mean(),
                                    in_view.reshape(-1, 3).std(0).mean()))
    assert np.abs(offsets).max() < 25 and np.abs(np.mean(offsets, 0)).max() < 3  # zero-mean modulation
    small, large = np.mean(swing["small"], 0), np.mean(swing["large"], 0)
    assert len(swing["small"]) >= 20 and small[1] > 25 and small[2] < 0.25 * small[1]
    assert large[2] > 2 * small[2]


def test_attribute_probe_set_pairs_one_small_object_with_its_pattern(world):
    """eval/probe: train/ from the train split, test/ from val, only images with exactly one
    small object; its one region is that object and its class is the object's fill pattern."""
    out, result = world
    probe = out / "eval" / "probe"
    info = json.loads((probe / "info.json").read_text())
    assert info["task"] == "attribute_probe" and (probe / "classnames.txt").read_text().split() == list(PATTERNS)
    for split, source in (("train", "train"), ("test", "val")):
        samples = read_dir(probe / split)
        originals = read_dir(out / source)
        two = [k for k, s in originals.items() if json.loads(s["json"])["n_objects"] == 2]
        assert list(samples) == two and len(two) > 0
        for key, s in samples.items():
            meta, original = json.loads(s["json"]), json.loads(originals[key]["json"])
            assert meta["regions"] == original["regions"][1:] and original["regions"][1]["caption"].startswith("a small")
            assert PATTERNS[int(s["cls"])] == original["patterns"][1] == meta["pattern"]
            assert s["jpg"] == originals[key]["jpg"]
    assert info["n_images"] == len(read_dir(probe / "test")) and info["n_fit"] == len(read_dir(probe / "train"))
    # every small object keeps at least ~24 px a side at the default 256 px
    assert result["metrics"]["small_box_min_px"] >= 24


def test_captions_name_the_fill_pattern(world):
    """The long caption names every object's pattern; short captions name the primary's unless
    it is solid; region captions name it always."""
    out, _ = world
    for s in list(read_dir(out / "train").values())[:40]:
        meta = json.loads(s["json"])
        for region, pattern in zip(meta["regions"], meta["patterns"]):
            assert region["caption"].split()[2] == pattern
            assert f"{pattern} {region['label']}" in meta["long_caption"]
        primary = meta["patterns"][0]
        assert all((f"{primary} {meta['regions'][0]['label']}" in c) == (primary != "solid")
                   for c in meta["captions"])
