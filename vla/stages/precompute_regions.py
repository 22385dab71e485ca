"""`vla precompute-regions`: DCLIP's region table — detect, crop, encode with the frozen CLIP.

Story (docs/methods.md §2): the data's images → the detector (`--detector`: a trained YOLO artifact, a
user's YOLOv8 `.pt`, or `oracle` = the data's own exact boxes) with ultralytics' defaults
(conf 0.25, IoU 0.7, at most 300 detections; the image size is a recipe value) → boxes cleaned
(NaN, empty or wholly-outside boxes dropped and counted; partly-outside ones clipped), every
detection kept (`top_k: N` keeps the N most confident: a deviation, counted) → each crop resized
to the CLIP's square input (`crop_resize: squash`, as the public code; `center_crop`: the CLIP's
own resize + centre crop) and the whole image through the frozen CLIP image encoder **with the
CLIP's own normalisation** (the public code forgets it) → the regions table (`vla.data.regions`),
keyed by sample key, sharded and memory-mapped. The whole image's embedding is stored beside the
regions (the "no regions" arm, the preservation target); an image with no usable detection gets
the whole image as its one region and is counted. Detection and crop encoding are batched; the
table is written shard by shard, so an interrupted run resumes after its last finished shard.
Under torchrun, rank r detects and encodes the shards s with s % N == r on its own device; rank 0
writes the index once every rank is done.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from vla.artifacts import Artifact, ArtifactBuilder, claim_out
from vla.errors import UserError

KIND = "precompute-regions"
REGIONS_DIR = "regions"


@dataclass
class DetectConfig:
    """Detector settings; the defaults are ultralytics' (and DCLIP's), except the image size."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 300
    imgsz: int = 640
    batch_size: int = 16            # images per detector call


@dataclass
class PrecomputeRegionsRecipe:
    detector: str = "yolov8x"       # `oracle`, a train-detector artifact, a YOLO .pt on disk, an alias
    clip: str = "clip-vit-b-16"     # the frozen CLIP whose image encoder embeds the crops
    detect: DetectConfig = field(default_factory=DetectConfig)
    top_k: Optional[int] = None     # most regions kept per image, by confidence; None: every detection
                                    # (the public code's; a number here is a deviation, counted)
    crop_resize: Literal["squash", "center_crop"] = "squash"  # a crop → the CLIP's square input:
                                    # resized to it whatever its aspect (the public code), or the
                                    # CLIP's own resize-shortest-side + centre crop
    min_box_size: float = 1.0       # pixels; a clipped box narrower or lower than this is dropped
    encode_batch_size: int = 256    # crops per CLIP forward
    shard_size: int = 1000          # data records per table shard (the unit of resumption)
    split: str = "train"            # the split of a synth artifact to read
    device: str = "auto"            # for the CLIP: auto | cpu | cuda
    max_skip_fraction: float = 0.01

    def __post_init__(self) -> None:
        d = self.detect
        checks = {"top_k": (self.top_k, self.top_k is None or self.top_k >= 1),
                  "crop_resize": (self.crop_resize, self.crop_resize in ("squash", "center_crop")),
                  "shard_size": (self.shard_size, self.shard_size >= 1),
                  "encode_batch_size": (self.encode_batch_size, self.encode_batch_size >= 1),
                  "detect.batch_size": (d.batch_size, d.batch_size >= 1), "detect.conf": (d.conf, 0 <= d.conf <= 1),
                  "detect.iou": (d.iou, 0 < d.iou <= 1), "detect.max_det": (d.max_det, d.max_det >= 1),
                  "detect.imgsz": (d.imgsz, d.imgsz >= 32), "min_box_size": (self.min_box_size, self.min_box_size > 0),
                  "device": (self.device, self.device in ("auto", "cpu", "cuda"))}
        for key, (value, ok) in checks.items():
            if not ok:
                raise UserError(f"precompute-regions recipe: {key} has an invalid value: {value!r}")


def clip_pixels(clip, images, squash: bool = False) -> torch.Tensor:
    """Images (crops or whole) → the CLIP's input tensor, by the CLIP's own preprocessing
    (open_clip's transform: resize, centre crop, to tensor, normalise with the model's mean/std).
    `squash`: each image is first resized to the CLIP's square input whatever its aspect (bicubic,
    as open_clip resizes), so the centre crop cuts nothing — DCLIP's public code feeds crops so."""
    from PIL import Image

    size = clip.image_size if isinstance(clip.image_size, tuple) else (clip.image_size, clip.image_size)
    prepared = (im.convert("RGB").resize((size[1], size[0]), Image.BICUBIC) if squash else im.convert("RGB")
                for im in images)
    return torch.stack([clip.preprocess(im) for im in prepared])


@torch.no_grad()
def encode_images(clip, images, batch_size: int, squash: bool = False) -> np.ndarray:
    """(N, D) L2-normalised image embeddings, `batch_size` images per forward (`squash`: see
    `clip_pixels`)."""
    device = next(clip.model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = clip_pixels(clip, images[start:start + batch_size], squash).to(device)
        out.append(clip.model.encode_image(pixels, normalize=True).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, clip.embed_dim), np.float32)


def _detections(detector, samples, cfg: PrecomputeRegionsRecipe) -> list[list[tuple[tuple, float, int]]]:
    """(box, conf, class) per sample: the detector's, batched, or the data's own boxes (oracle)."""
    if detector.is_oracle:
        return [[(tuple(r.box), float(r.score), -1) for r in s.regions] for s in samples]
    from vla.models.dclip.yolo import detect

    d = cfg.detect
    found = detect(detector.model, [s.image.convert("RGB") for s in samples], conf=d.conf, iou=d.iou,
                   max_det=d.max_det, imgsz=d.imgsz, batch_size=d.batch_size)
    return [[(det.box, det.conf, det.cls) for det in dets] for dets in found]


def regions_of_batch(detector, clip, samples, cfg: PrecomputeRegionsRecipe, counts: dict):
    """Detect, clean, crop and encode a batch of samples; update `counts`; ImageRegions per sample."""
    from vla.data.regions import ImageRegions, clean_boxes, clip_box

    found = _detections(detector, samples, cfg)
    crops, plan = [], []  # plan: per sample, its (box, conf, cls) list
    for s, dets in zip(samples, found):
        w, h = s.image.size
        kept, dropped = clean_boxes([b for b, _, _ in dets], w, h, cfg.min_box_size)
        for reason, n in dropped.items():
            counts["boxes_dropped"][reason] += n
        dets = sorted((dets[i] for i in kept), key=lambda d: -d[1])  # confidence order, stable
        if cfg.top_k is not None:
            counts["regions_over_top_k"] += max(0, len(dets) - cfg.top_k)
            dets = dets[:cfg.top_k]
        dets = [(clip_box(b, w, h), c, k) for b, c, k in dets]
        if not dets:  # nothing usable: the whole image is the one region
            counts["no_detection"] += 1
            dets = [((0, 0, w, h), 1.0, -1)]
        plan.append(dets)
        crops += [s.image.crop(b) for b, _, _ in dets]
    emb = np.concatenate([encode_images(clip, crops, cfg.encode_batch_size, squash=cfg.crop_resize == "squash"),
                          encode_images(clip, [s.image for s in samples], cfg.encode_batch_size)])
    out, row = [], 0
    for i, (s, dets) in enumerate(zip(samples, plan)):
        k = len(dets)
        w, h = s.image.size
        boxes = np.array([b for b, _, _ in dets], np.float32)
        out.append(ImageRegions(
            key=s.key, global_emb=emb[len(crops) + i], emb=emb[row:row + k], boxes=boxes,
            conf=np.array([c for _, c, _ in dets], np.float32), cls=np.array([k_ for _, _, k_ in dets], np.int32),
            area=(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (w * h)))
        row += k
        counts["regions"] += k
    return out


def _records(source):
    for f in source.files:
        yield from source.records(f)


def run(cfg: PrecomputeRegionsRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.data.regions import finished_shards, new_counts, write_index, write_shard
    from vla.data.skips import SkipCounter
    from vla.data.stream import resolve_data
    from vla.distributed import barrier, init_distributed
    from vla.models.dclip import load_dclip_clip
    from vla.models.dclip.detector import resolve_detector
    from vla.stages.common import training_data

    # everything that can be refused is refused before any compute
    claim_out(out, force=force, inputs={"data": data, "detector": cfg.detector, "clip": cfg.clip})
    td = training_data(data, split=cfg.split)
    detector = resolve_detector(cfg.detector)
    clip, clip_ref, clip_identity = load_dclip_clip(cfg.clip)
    dist = init_distributed(cfg.device)  # under torchrun: rank r does the shards s with s % N == r
    clip.model.to(dist.device).eval()
    source = resolve_data(td.path)

    recipe = {**asdict(cfg), "clip_identity": clip_identity}
    inputs = {**td.inputs, "detector": detector.reference, "clip": clip_ref}
    with ArtifactBuilder(out, KIND, recipe=recipe, inputs=inputs, force=force, command=command) as art:
        root = art.dir / REGIONS_DIR
        finished = set(finished_shards(root))

        def skip(i: int) -> bool:  # a shard a previous run finished, or another rank's
            return i in finished or i % dist.world_size != dist.rank

        t0, images = time.perf_counter(), 0
        shard, batch, pending = 0, [], []
        counts = new_counts()
        for n, record in enumerate(_records(source)):
            if n // cfg.shard_size != shard:  # the previous shard's records are all read
                if not skip(shard):
                    images += _flush(detector, clip, cfg, batch, pending, counts)
                    write_shard(root, shard, pending, clip.embed_dim, counts)
                shard, batch, pending, counts = n // cfg.shard_size, [], [], new_counts()
            if skip(shard):
                continue  # a shard a previous run finished, or another rank's
            skips = SkipCounter()
            sample = source.load(record, skips)
            _add_skips(counts, skips)
            if sample is not None:
                batch.append(sample)
                if len(batch) == cfg.detect.batch_size:
                    images += _flush(detector, clip, cfg, batch, pending, counts)
        if not skip(shard):
            images += _flush(detector, clip, cfg, batch, pending, counts)
            write_shard(root, shard, pending, clip.embed_dim, counts)
        wall = time.perf_counter() - t0
        barrier()  # every rank's shards are written
        if dist.rank != 0:
            return art.artifact

        meta = {"dim": clip.embed_dim, "top_k": cfg.top_k, "clip": clip_identity, "detector": detector.reference,
                "data_digest": source.digest()}
        total = write_index(root, meta)
        skipped = sum(total["data"]["skipped"].values())
        if total["data"]["seen"] and skipped / total["data"]["seen"] > cfg.max_skip_fraction:
            from vla.errors import StageError

            raise StageError(f"{skipped} of {total['data']['seen']} samples in {td.path} skipped "
                             f"({total['data']['skipped']}), above max_skip_fraction={cfg.max_skip_fraction:g}; "
                             f"fix the data or raise the limit")
        art.counts.update(total)
        art.counts["images"] = total["data"]["seen"] - skipped
        art.counts["ranks"] = dist.world_size
        art.timings.update(images_per_s=images / wall if wall > 0 else None, regions_wall_s=wall)  # rank 0's
    return art.artifact


def _flush(detector, clip, cfg, batch: list, pending: list, counts: dict) -> int:
    """Detect and encode the batched samples into `pending`; returns how many there were."""
    n = len(batch)
    if batch:
        pending += regions_of_batch(detector, clip, batch, cfg, counts)
        batch.clear()
    return n


def _add_skips(counts: dict, skips) -> None:
    counts["data"]["seen"] += skips.seen
    for reason, n in skips.skipped.items():
        counts["data"]["skipped"][reason] = counts["data"]["skipped"].get(reason, 0) + n
