"""Object detectors through ultralytics (DCLIP's region proposals).

A name is an alias (`yolov8x`), a model `.yaml` (built from ultralytics' own configs, random init,
offline) or a `.pt` checkpoint on disk. ultralytics checkpoints are pickles of its model classes,
which ultralytics' own loader unpickles unrestricted; vla reads a `.pt` itself through the
restricted unpickler of `vla.models.safe_pickle` (a pickle that asks for anything but torch, numpy,
ultralytics model classes and plain values is refused by name, before any of it runs) and hands
the objects to ultralytics, so ultralytics never reads the file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

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
    if path.suffix in (".yaml", ".yml") and path.is_file():
        check_model_yaml(path)
    with torch_threads_kept():
        if path.suffix == ".pt" and path.is_file():
            return _yolo_from_checkpoint(ultralytics, path)
        try:
            return ultralytics.YOLO(str(path) if path.exists() else target)
        except FileNotFoundError as err:
            raise UserError(f"detector {target}: {err}") from err


def _yolo_from_checkpoint(ultralytics: Any, path: Path) -> Any:
    """A YOLO from a `.pt` read by vla's restricted unpickler; ultralytics gets the objects, not the file."""
    import torch

    from vla.models.safe_pickle import load_checkpoint

    ckpt = load_checkpoint(path, what="detector")
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"detector {path} is a torch file without an ultralytics model in it (no 'model' or "
                        f"'ema' module); pass the .pt that YOLO(...).save() or ultralytics' trainer writes")
    with _checkpoint_given(path, ckpt):
        return ultralytics.YOLO(str(path))


@contextlib.contextmanager
def _checkpoint_given(path: Path, ckpt: dict) -> Iterator[None]:
    """While YOLO(path) is built, ultralytics' file reader returns `ckpt` instead of unpickling `path`
    (its model-compatibility steps still run); any other file it would read is refused."""
    from ultralytics.nn import tasks

    if not hasattr(tasks, "torch_safe_load"):
        raise UserError(f"detector {path}: this ultralytics {ultralytics_version()} has no torch_safe_load, which "
                        f"vla replaces to load .pt files safely; install ultralytics 8.2 to 8.4")
    unsafe = tasks.torch_safe_load

    def given(weight: Any, *args: Any, **kwargs: Any) -> tuple[dict, str]:
        if Path(str(weight)).resolve() != path.resolve():
            raise UserError(f"ultralytics asked to unpickle {weight} while loading {path}; refused")
        return ckpt, str(weight)

    tasks.torch_safe_load = given
    try:
        yield
    finally:
        tasks.torch_safe_load = unsafe


@contextlib.contextmanager
def restricted_label_caches() -> Iterator[None]:
    """While ultralytics trains, its label caches (`labels/*.cache`, pickles it loads with
    `allow_pickle=True`) are read by vla's restricted unpickler; a cache it refuses (or any
    unreadable one) is rebuilt by ultralytics from the labels, as a stale cache is."""
    from ultralytics.data import dataset

    from vla.models.safe_pickle import load_npy_object

    unsafe = getattr(dataset, "load_dataset_cache_file", None)
    dataset.load_dataset_cache_file = load_npy_object
    try:
        yield
    finally:
        if unsafe is not None:
            dataset.load_dataset_cache_file = unsafe


def check_model_yaml(path: Path) -> None:
    """Refuse a YOLO model config that would make ultralytics run code while building the model.

    ultralytics' `parse_model` `eval()`s the config's `activation` string and looks each layer's
    module name up among its own module's globals (functions such as `torch_safe_load` included)
    before calling it with the config's arguments. So a model `.yaml` (a user's `--detector`, a
    train-detector artifact's, a recipe's `model`) must name only `torch.nn.Module` classes, and
    its activation must be a `nn.<Class>(<literals>)` call, as ultralytics' own restricted mode
    requires."""
    import ast

    import torch
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"model config {path} is not a readable YAML file ({type(err).__name__}); pass an "
                        f"ultralytics model .yaml (e.g. yolov8n.yaml)") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("backbone"), list) or not isinstance(cfg.get("head"), list):
        raise UserError(f"model config {path} is not an ultralytics model config (backbone and head lists)")
    from ultralytics.nn import tasks

    def refuse(what: str) -> None:
        raise UserError(f"model config {path} refused: {what}, which ultralytics would run while building the "
                        f"model; use an ultralytics model config that names torch.nn module classes only")

    for layer in cfg["backbone"] + cfg["head"]:
        name = layer[2] if isinstance(layer, list) and len(layer) == 4 else None
        if not isinstance(name, str):
            refuse(f"the layer {layer!r} (not [from, repeats, module, args])")
        module = (getattr(torch.nn, name[3:], None) if name.startswith("nn.")
                  else getattr(__import__("torchvision").ops, name[16:], None) if name.startswith("torchvision.ops.")
                  else vars(tasks).get(name))
        if not (isinstance(module, type) and issubclass(module, torch.nn.Module)):
            refuse(f"the layer module {name!r} (not a torch.nn.Module class)")
    act = cfg.get("activation")
    if act is not None:
        try:
            call = ast.parse(str(act).strip(), mode="eval").body
            assert isinstance(call, ast.Call)
            func = call.func
            dotted = []
            while isinstance(func, ast.Attribute):
                dotted.append(func.attr)
                func = func.value
            assert isinstance(func, ast.Name) and [func.id, *reversed(dotted)][:-1] in (["nn"], ["torch", "nn"])
            klass = getattr(torch.nn, dotted[0], None)
            assert isinstance(klass, type) and issubclass(klass, torch.nn.Module)
            for a in [*call.args, *(k.value for k in call.keywords)]:
                ast.literal_eval(a)
        except (SyntaxError, ValueError, AssertionError, IndexError):
            refuse(f"the activation {act!r} (not nn.<Class>(<literal arguments>))")


def ultralytics_version() -> str:
    import ultralytics

    return getattr(ultralytics, "__version__", "?")


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
