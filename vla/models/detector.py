"""Object detectors through ultralytics (DCLIP's region proposals).

A name is an alias (`yolov8x`), a model `.yaml` (built from ultralytics' own configs, random init,
offline) or a `.pt` checkpoint on disk. ultralytics checkpoints are full pickles that ultralytics
itself loads; vla only makes sure the file is there instead of letting ultralytics try to download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Sequence

from PIL import Image

from vla.errors import UserError
from vla.models import registry
from vla.offline import import_ultralytics, is_offline, torch_threads_kept


class Detection(NamedTuple):
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the original image
    conf: float
    cls: int


def load_detector(name: str) -> Any:
    """An ultralytics YOLO model; UserError for a checkpoint that is not on disk."""
    alias = registry.alias(name)
    if alias is not None and alias.kind != "detector":
        raise UserError(f"{name} is a {alias.kind}, not a detector; pass a YOLO .pt file or model .yaml")
    target = alias.target if alias else name
    path = Path(target).expanduser()
    if path.suffix == ".pt" and not path.is_file():
        # a bare name (yolov8x.pt) is an ultralytics download, possible only with network
        if is_offline() or path.parent != Path("."):
            raise UserError(
                f"detector {target} is not on disk; download it once with network (HF_HUB_OFFLINE=0 vla ...) "
                f"or pass the path of a local .pt, or a model .yaml (yolov8n.yaml) to train one from scratch"
            )
    elif path.suffix not in (".pt", ".yaml", ".yml"):
        raise UserError(f"detector {name!r}: expected a YOLO .pt checkpoint or a model .yaml")
    ultralytics = import_ultralytics()
    with torch_threads_kept():
        try:
            return ultralytics.YOLO(str(path) if path.exists() else target)
        except FileNotFoundError as err:
            raise UserError(f"detector {target}: {err}") from err


def detect(
    model: Any,
    images: Sequence[Image.Image],
    conf: float = 0.25,
    iou: float = 0.7,
    max_det: int = 300,
    imgsz: int = 640,
    batch_size: int = 16,
    device: str | None = None,
) -> list[list[Detection]]:
    """Boxes per image; the defaults are ultralytics' (and DCLIP's): conf 0.25, IoU 0.7, 300, 640 px."""
    out: list[list[Detection]] = []
    with torch_threads_kept():
        for start in range(0, len(images), batch_size):
            results = model.predict(
                list(images[start : start + batch_size]),
                conf=conf, iou=iou, max_det=max_det, imgsz=imgsz, device=device, verbose=False,
            )
            for r in results:
                boxes = r.boxes
                out.append([
                    Detection(tuple(float(v) for v in xyxy), float(c), int(k))
                    for xyxy, c, k in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist())
                ])
    return out
