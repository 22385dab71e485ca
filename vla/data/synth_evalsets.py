"""The embedded world's evaluation sets, in CLIP_benchmark's WebDataset layout (read back by
`vla.evaluate.evalsets`): retrieval, long_retrieval, zeroshot, regional, captioning, grounding
from the test split, and the attribute probe from train and val."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla.data.shards import ShardWriter
from vla.data.synth_text import CLASSNAMES, PATTERNS, TEMPLATES

EVAL_TASKS = ("retrieval", "long_retrieval", "zeroshot", "regional", "captioning", "grounding", "probe")
EVAL_INFO_TASKS = {"probe": "attribute_probe"}  # info.json's task where it differs from the set's name


@dataclass(frozen=True)
class MadeSample:
    """One rendered sample as the worker returns it: what the shards and the eval sets write."""
    split: str
    index: int
    key: str
    jpg: bytes
    meta: dict[str, Any]  # the Sample's JSON
    yolo: str  # YOLO label lines: "shape_index cx cy w h", normalised


def json_bytes(d: dict[str, Any]) -> bytes:
    """A sample's JSON as the shards store it (UTF-8, not ASCII-escaped)."""
    return json.dumps(d, ensure_ascii=False).encode("utf-8")


def sample_captions(meta: dict[str, Any]) -> list[str]:
    """A sample JSON's short captions."""
    return meta.get("captions", [meta["caption"]])  # Sample.to_json drops a list of one


class EvalSetWriter:
    """The CLIP_benchmark-layout evaluation sets, filled from the test split in one pass (the
    retrieval set at the end, once every test caption is known), and the attribute probe's set,
    filled from the train and val splits."""

    def __init__(self, root: Path, shard_size: int, probe_train: int):
        self.root = root
        self.writers = {t: ShardWriter(root / t / "test", maxcount=shard_size) for t in EVAL_TASKS}
        self.probe_fit = ShardWriter(root / "probe" / "train", maxcount=shard_size)
        self.probe_train = probe_train
        self.n_texts = Counter()
        self.retrieval: list[tuple[MadeSample, list[str]]] = []
        self.region_owner: set[str] = set()
        self.regional_dropped = {"dropped_regions": 0, "dropped_images": 0}

    def _write(self, task: str, m: MadeSample, lines: list[str], meta: dict[str, Any] | None = None) -> None:
        self.writers[task].write_raw(m.key, {"jpg": m.jpg, "txt": "\n".join(lines).encode("utf-8"),
                                             "json": json_bytes(meta or m.meta)})
        self.n_texts[task] += len(lines)

    def add(self, m: MadeSample) -> None:
        captions = sample_captions(m.meta)
        self.retrieval.append((m, captions))
        texts = {"long_retrieval": [m.meta["long_caption"]], "captioning": captions}
        for task, lines in texts.items():
            self._write(task, m, lines)
        self.writers["zeroshot"].write_raw(m.key, {"jpg": m.jpg, "cls": str(m.meta["label"]).encode(),
                                                   "json": json_bytes(m.meta)})
        self._add_regional(m)
        regions = m.meta["regions"]
        if len(regions) >= 2:  # with one box, grounding has nothing to choose
            grounding = [{**r, "caption": c} for r, c in zip(regions, m.meta["grounding_captions"])]
            self._write("grounding", m, [r["caption"] for r in grounding], {**m.meta, "regions": grounding})

    def _add_regional(self, m: MadeSample) -> None:
        """Each region whose caption no earlier test region has: every caption in the set then
        names one region (a shared one could not tell its regions apart). A region caption says
        only size, pattern, colour and shape (~450 values), so, unlike the global set, which drops
        every copy of a shared caption, the set keeps the first region with each caption; an
        image left without regions is left out. The rest are counted."""
        kept = [r for r in m.meta["regions"] if r["caption"] not in self.region_owner]
        self.region_owner.update(r["caption"] for r in kept)
        self.regional_dropped["dropped_regions"] += len(m.meta["regions"]) - len(kept)
        if kept:
            self._write("regional", m, [r["caption"] for r in kept], {**m.meta, "regions": kept})
        else:
            self.regional_dropped["dropped_images"] += 1

    def add_probe(self, m: MadeSample) -> None:
        """Train and val images with exactly one small object go to the attribute probe's set
        (fit on train/, scored on test/ = val): its one region is that object, its class the
        object's fill pattern."""
        if m.meta["n_objects"] != 2 or m.split not in ("train", "val"):
            return
        writer = self.probe_fit if m.split == "train" else self.writers["probe"]
        if m.split == "train" and writer.total >= self.probe_train:
            return
        meta = {"key": m.key, "regions": m.meta["regions"][1:], "pattern": m.meta["patterns"][1]}
        writer.write_raw(m.key, {"jpg": m.jpg, "cls": str(PATTERNS.index(meta["pattern"])).encode(),
                                 "json": json_bytes(meta)})

    def _write_retrieval(self) -> dict[str, int]:
        """Each image with only the captions no other image has; an image left with none is left
        out. Returns what was dropped."""
        owners = Counter(c for _, captions in self.retrieval for c in set(captions))
        dropped = {"dropped_captions": 0, "dropped_images": 0}
        for m, captions in self.retrieval:
            unique = [c for c in captions if owners[c] == 1]
            dropped["dropped_captions"] += len(captions) - len(unique)
            if unique:
                self._write("retrieval", m, unique)
            else:
                dropped["dropped_images"] += 1
        return dropped

    def close(self) -> dict[str, dict[str, int]]:
        dropped = self._write_retrieval()
        (self.root / "zeroshot" / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
        (self.root / "zeroshot" / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
        (self.root / "probe" / "classnames.txt").write_text("\n".join(PATTERNS) + "\n")
        self.n_texts["zeroshot"] = len(CLASSNAMES)
        self.probe_fit.close()
        _clip_benchmark_layout(self.root / "probe", self.probe_fit, None, split="train")
        counts = {}
        for task, w in self.writers.items():
            w.close()
            # grounding and probe are vla's own tasks: no dataset_type.txt for CLIP_benchmark
            _clip_benchmark_layout(self.root / task, w, "classification" if task == "zeroshot"
                                   else None if task in ("grounding", "probe") else "retrieval")
            info = {"task": EVAL_INFO_TASKS.get(task, task), "n_images": w.total}
            if task == "probe":
                info.update(n_fit=self.probe_fit.total, n_classes=len(PATTERNS),
                            attribute="fill pattern of the image's one small object")
            else:
                info["n_texts"] = self.n_texts[task]
            if task == "zeroshot":
                info.update(n_classes=len(CLASSNAMES), n_templates=len(TEMPLATES))
            if task == "retrieval":
                info.update(dropped)
            if task == "regional":
                info.update(self.regional_dropped)
            (self.root / task / "info.json").write_text(json.dumps(info, indent=1) + "\n")
            counts[task] = {k: v for k, v in info.items() if k not in ("task", "attribute")}
        return counts


def _clip_benchmark_layout(root: Path, writer: ShardWriter, dataset_type: str | None,
                           split: str = "test") -> None:
    """What CLIP_benchmark's `build_wds_dataset` reads: shards named <split>/0.tar, 1.tar, …,
    <split>/nshards.txt, and dataset_type.txt (without which a set is read as classification)."""
    for i, shard in enumerate(writer.shards):
        shard.rename(shard.with_name(f"{i}.tar"))
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / split / "nshards.txt").write_text(f"{len(writer.shards)}\n")
    if dataset_type is not None:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
