"""Evaluation sets in CLIP_benchmark's WebDataset layout, as vla's synthetic world writes them.

    <set>/info.json                                  {"task": ..., "name": ...}  (vla's, optional)
    <set>/dataset_type.txt                           CLIP_benchmark's: "retrieval" or
                                                       "classification" (the default)
    <set>/test/nshards.txt                           n: the shards are test/0.tar … test/{n-1}.tar
    <set>/test/*.tar                                 without nshards.txt: every shard, in numeric
                                                       order when all are numbered (or <set>/*.tar)
        key.jpg|jpeg|png|webp                        the image
        key.txt                                      captions / references, one per line
        key.cls                                      class index (zero-shot classification)
        key.json                                     {"regions": [{"box": [x0, y0, x1, y1],
                                                                   "caption": ...}, ...]}
    <set>/classnames.txt                             zero-shot: one class name per line
    <set>/zeroshot_classification_templates.txt      zero-shot: one template per line, `{c}` = class

Tasks: retrieval, long_retrieval (retrieval on long captions), zeroshot_classification (alias
zeroshot), regional_retrieval (alias regional: retrieval where the images are the region crops and
each crop's one text is its region caption; `EvalSet.region_sources` gives a model that reads
regions from the whole image — MM-GEM's RoIAlign — the full image and its boxes instead),
captioning (the captions are the references), grounding (vla's: each image's key.json regions
with their captions, which may name a position; a caption is to pick its own box among its image's
boxes), attribute_probe (vla's: key.cls is an attribute class of the one box in key.json;
a linear probe is fit on the set's `train/` split and scored on `test/`). Without info.json the task is dataset_type.txt's
(as CLIP_benchmark reads it); without either, classnames.txt → zero-shot classification,
otherwise retrieval.

Texts are read as CLIP_benchmark reads them: captions are `str.splitlines()` of key.txt, unstripped,
so a blank line is an (empty) caption; class names and templates are each line stripped, blank
ones kept (a blank class name still takes its class index). Blank lines are kept and counted in
`EvalSet.blank_lines`, with a warning.

Images are read lazily from the shards (file offset per image), so a 5,000-image set costs no
decoded pixels until a batch is encoded.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence, overload

from PIL import Image

from vla.errors import UserError

log = logging.getLogger(__name__)

TASKS = ("retrieval", "long_retrieval", "zeroshot_classification", "regional_retrieval",
         "captioning", "grounding", "attribute_probe")
# short names that vla's synthetic world also writes into info.json
TASK_ALIASES = {"zeroshot": "zeroshot_classification", "regional": "regional_retrieval",
                "probe": "attribute_probe"}
RETRIEVAL_TASKS = ("retrieval", "long_retrieval", "regional_retrieval")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
#: CLIP_benchmark's dataset_type.txt value of each vla task (what the synthetic world writes)
DATASET_TYPES = {"retrieval": "retrieval", "long_retrieval": "retrieval",
                 "regional_retrieval": "retrieval", "captioning": "retrieval",
                 "zeroshot_classification": "classification"}
#: the tasks whose samples' key.json give boxes (one `EvalSet.boxes` list per image)
BOX_TASKS = ("grounding", "attribute_probe")


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes lie in a shard, and the box to crop (regional retrieval)."""
    shard: Path
    offset: int
    size: int
    key: str
    box: tuple[float, float, float, float] | None = None


class LazyImages(Sequence[Image.Image]):
    """A list of RGB PIL images decoded from their shards on access."""

    def __init__(self, refs: list[ImageRef]):
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    @overload
    def __getitem__(self, i: int) -> Image.Image: ...
    @overload
    def __getitem__(self, i: slice) -> list[Image.Image]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._load(r) for r in self.refs[i]]
        return self._load(self.refs[i])

    def __iter__(self) -> Iterator[Image.Image]:
        return (self._load(r) for r in self.refs)

    @staticmethod
    def _load(ref: ImageRef) -> Image.Image:
        with open(ref.shard, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as err:
            raise UserError(f"eval image {ref.key} in {ref.shard} cannot be decoded ({err}); "
                            f"rewrite the shard or remove the sample") from None
        if ref.box is None:
            return image
        # boxes may overhang the image by rounding: clamp rather than pad with black
        x0, y0, x1, y1 = ref.box
        return image.crop((max(0, round(x0)), max(0, round(y0)),
                           min(image.width, max(round(x1), round(x0) + 1)),
                           min(image.height, max(round(y1), round(y0) + 1))))


@dataclass
class EvalSet:
    """One evaluation set. `captions[i]` are the texts of `images[i]` (one per crop for regional
    retrieval, the references for captioning); `labels[i]` its class for zero-shot sets."""
    name: str
    task: str
    path: Path
    images: Sequence[Image.Image]
    captions: list[list[str]] = field(default_factory=list)
    labels: list[int] | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None
    #: regional retrieval: the source image key of each crop (its box is in `images.refs`)
    regions: list[str] | None = None
    #: blank lines read as CLIP_benchmark reads them: {file kind: count}
    blank_lines: dict[str, int] = field(default_factory=dict)
    #: grounding / attribute_probe: each image's boxes (its own pixels); grounding's
    #: `captions[i][j]` is the query of `boxes[i][j]`
    boxes: list[list[tuple[float, float, float, float]]] | None = None
    #: attribute_probe: the set's train split (the same fields), which the probe is fit on
    fit: "EvalSet | None" = None

    def texts(self) -> tuple[list[str], list[int]]:
        """All captions flattened, and the index of each caption's image."""
        texts = [c for caps in self.captions for c in caps]
        owner = [i for i, caps in enumerate(self.captions) for _ in caps]
        return texts, owner

    def region_sources(self, indices: Sequence[int] | None = None) -> list[RegionSource]:
        """Regional sets: the full (uncropped) source image of the regions `indices` (all by
        default, ascending), each image once, with its regions' boxes in its own pixels — what a
        model that embeds or captions a region from the whole image and its box is given."""
        if self.task != "regional_retrieval":
            raise ValueError(f"{self.name} is a {self.task} set, not a regional one")
        refs = self.images.refs
        sources: list[RegionSource] = []
        for i in range(len(refs)) if indices is None else indices:
            ref = refs[i]
            image = replace(ref, box=None)
            if not sources or sources[-1].image != image:
                sources.append(RegionSource(image, [], []))
            sources[-1].boxes.append(ref.box)
            sources[-1].regions.append(i)
        return sources


@dataclass
class RegionSource:
    """One source image of a regional set, uncropped, and the regions of it that are asked for."""
    image: ImageRef
    boxes: list[tuple[float, float, float, float]]   # in the image's own pixels
    regions: list[int]                               # their indices in the set (`EvalSet.images`)

    def load(self) -> Image.Image:
        return LazyImages._load(self.image)


def _read_lines(path: Path) -> list[str]:
    """CLIP_benchmark's `[line.strip() for line in read_txt(f).splitlines()]`: blanks kept."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _shards(path: Path, split: str = "test") -> list[Path]:
    """The shards in CLIP_benchmark's order: test/0.tar … test/{n-1}.tar from nshards.txt; without
    it every shard, numbered ones in numeric order (so 10.tar comes after 9.tar)."""
    nshards = path / split / NSHARDS
    if nshards.exists():
        try:
            n = int(nshards.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{nshards} must hold the number of shards; fix it") from None
        shards = [path / split / f"{i}.tar" for i in range(n)]
        missing = [p for p in shards if not p.exists()]
        if missing:
            raise UserError(f"{nshards} says {n} shards but {missing[0]} does not exist; "
                            f"fix {NSHARDS} or restore the shard")
        if shards:
            return shards
    for folder in (path / split, path) if split == "test" else (path / split,):
        shards = list(folder.glob("*.tar"))
        if shards:
            numbered = all(re.fullmatch(r"\d+", p.stem) for p in shards)
            return sorted(shards, key=(lambda p: int(p.stem)) if numbered else (lambda p: p.name))
    raise UserError(f"eval set {path} has no shards (expected {path}/{split}/*.tar); "
                    f"write it with `vla` or CLIP_benchmark's WebDataset layout")


def _samples(shard: Path) -> dict[str, dict[str, tarfile.TarInfo | bytes]]:
    """key → {ext: TarInfo for images, bytes for the small text members}, in shard order.

    The key is the member name up to the first dot of its basename, as WebDataset splits it.
    """
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, _, base = info.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                ext = ext.lower()
                member = info if ext in IMAGE_EXTS else tar.extractfile(info).read()
                samples.setdefault(key, {})[ext] = member
    except tarfile.TarError as err:
        raise UserError(f"eval shard {shard} is not a readable tar ({err}); rewrite it") from None
    return samples


def _read_info(path: Path) -> dict:
    """info.json, with the task checked or inferred when the file is absent."""
    file = path / "info.json"
    if not file.exists():
        if (path / DATASET_TYPE).exists():
            kind = (path / DATASET_TYPE).read_text(encoding="utf-8").strip().lower()
            if kind not in ("retrieval", "classification"):
                raise UserError(f"{path / DATASET_TYPE} says {kind!r}; vla reads 'retrieval' and "
                                f"'classification' sets")
            return {"task": "retrieval" if kind == "retrieval" else "zeroshot_classification"}
        task = "zeroshot_classification" if (path / CLASSNAMES).exists() else "retrieval"
        return {"task": task}
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{file} is not valid JSON ({err}); fix or delete it") from None
    info["task"] = TASK_ALIASES.get(info.get("task"), info.get("task"))
    if info["task"] not in TASKS:
        raise UserError(f"{file} has task {info['task']!r}; use one of {', '.join(TASKS)}")
    return info


def load_eval_set(path: str | Path) -> EvalSet:
    """Read one eval set directory (see the module doc). Errors name the set and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"eval set {path} does not exist; pass a directory with test/*.tar "
                        f"(and info.json)")
    info = _read_info(path)
    task = info["task"]
    es = _load_split(path, info, "test")
    if task == "attribute_probe":
        es.fit = _load_split(path, info, "train")
    return es


def _load_split(path: Path, info: dict, split: str) -> EvalSet:
    task = info["task"]
    es = EvalSet(name=str(info.get("name", path.name)), task=task, path=path, images=[])
    if task in BOX_TASKS:
        es.boxes = []
    if task == "attribute_probe":
        if not (path / CLASSNAMES).exists():
            raise UserError(f"attribute-probe eval set {path} lacks {CLASSNAMES}; add it (one class a line)")
        es.classnames, es.labels = _read_lines(path / CLASSNAMES), []
    if task == "zeroshot_classification":
        for f in (CLASSNAMES, TEMPLATES):
            if not (path / f).exists():
                raise UserError(f"zero-shot eval set {path} lacks {f}; add it (one entry a line)")
        es.classnames, es.templates = _read_lines(path / CLASSNAMES), _read_lines(path / TEMPLATES)
        if not es.classnames or not es.templates:
            raise UserError(f"eval set {path}: need ≥ 1 class name and ≥ 1 template; fix "
                            f"{CLASSNAMES} / {TEMPLATES}")
        for kind, lines in (("classnames", es.classnames), ("templates", es.templates)):
            if blank := sum(not line for line in lines):
                es.blank_lines[kind] = blank
        es.labels = []
    refs: list[ImageRef] = []
    if task == "regional_retrieval":
        es.regions = []
    for shard in _shards(path, split):
        for key, members in _samples(shard).items():
            image_ext = next((e for e in IMAGE_EXTS if e in members), None)
            if image_ext is None:
                raise UserError(f"sample {key} in {shard} has no image "
                                f"({'/'.join(IMAGE_EXTS)}); add it or remove the sample")
            image = members[image_ext]
            ref = ImageRef(shard, image.offset_data, image.size, key)
            if task == "regional_retrieval":
                for box, caption in _regions(members, key, shard):
                    refs.append(replace(ref, box=box))
                    es.captions.append([caption])
                    es.regions.append(key)
                continue
            refs.append(ref)
            if task in BOX_TASKS:
                regions = list(_regions(members, key, shard))
                if not regions or (task == "attribute_probe") != (len(regions) == 1):
                    raise UserError(f"sample {key} in {shard} has {len(regions)} regions; a {task} "
                                    f"sample needs {'exactly one' if task == 'attribute_probe' else 'at least one'}")
                es.boxes.append([box for box, _ in regions])
                if task == "grounding":
                    es.captions.append([caption for _, caption in regions])
                else:
                    es.labels.append(_label(members, key, shard, len(es.classnames)))
                continue
            if task == "zeroshot_classification":
                es.labels.append(_label(members, key, shard, len(es.classnames)))
            else:
                captions = _captions(members, key, shard, required=task == "captioning")
                es.captions.append(captions)
                if blank := sum(not c for c in captions):
                    es.blank_lines["captions"] = es.blank_lines.get("captions", 0) + blank
    if not refs:
        raise UserError(f"eval set {path} has no samples (or no regions); regenerate it")
    for kind, n in es.blank_lines.items():
        log.warning("eval set %s: %d blank line(s) in its %s, kept as CLIP_benchmark keeps them",
                    path, n, kind)
    es.images = LazyImages(refs)
    return es


def _captions(members: dict, key: str, shard: Path, required: bool) -> list[str]:
    """key.txt's lines as CLIP_benchmark splits them (`str.splitlines`: blank lines are captions,
    an empty file is an image without captions). Captioning needs ≥ 1 reference."""
    lines = members.get("txt", b"").decode("utf-8").splitlines()
    if required and not any(line.strip() for line in lines):
        raise UserError(f"sample {key} in {shard} has no reference caption (key.txt, one per "
                        f"line); add one")
    return lines


def _label(members: dict, key: str, shard: Path, n_classes: int) -> int:
    try:
        label = int(members["cls"].decode("utf-8").strip())
    except (KeyError, ValueError):
        raise UserError(f"sample {key} in {shard} needs key.cls with a class index") from None
    if not 0 <= label < n_classes:
        raise UserError(f"sample {key} in {shard} has class {label}, outside the "
                        f"{n_classes} classes of {CLASSNAMES}")
    return label


def _regions(members: dict, key: str, shard: Path):
    """(box, caption) of each region in key.json; a bad box or missing caption is an error."""
    try:
        regions = json.loads(members["json"].decode("utf-8"))["regions"]
    except (KeyError, ValueError):
        raise UserError(f"sample {key} in {shard} needs key.json with a \"regions\" list") from None
    for r in regions:
        box, caption = r.get("box"), str(r.get("caption", "")).strip()
        if not (isinstance(box, list) and len(box) == 4 and box[2] > box[0] and box[3] > box[1]):
            raise UserError(f"sample {key} in {shard} has a bad region box {box}; "
                            f"use [x0, y0, x1, y1] with x1 > x0, y1 > y0")
        if not caption:
            raise UserError(f"sample {key} in {shard} has a region without a caption; add one")
        yield tuple(float(v) for v in box), caption


def find_eval_sets(root: str | Path) -> list[Path]:
    """`root` itself when it is an eval set, else its sub-directories that are (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"eval sets directory {root} does not exist; generate or point to one")

    def is_set(p: Path) -> bool:
        return ((p / "info.json").exists() or (p / "test" / NSHARDS).exists()
                or any((p / "test").glob("*.tar")))

    if is_set(root):
        return [root]
    sets = sorted(p for p in root.iterdir() if p.is_dir() and is_set(p))
    if not sets:
        raise UserError(f"{root} holds no eval sets (directories with info.json and test/*.tar)")
    return sets
