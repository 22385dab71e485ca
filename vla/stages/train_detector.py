"""`vla train-detector`: a YOLO for DCLIP's regions, trained by ultralytics' own trainer.

A randomly initialised YOLO finds nothing, so the embedded curriculum trains one on the synthetic
world's YOLO copy (`vla synth` writes `yolo/data.yaml` with images and labels); real users skip
this stage and pass `--detector yolov8x.pt` to `vla precompute-regions`.

Story: `--data` (a synth artifact, or any ultralytics detection `data.yaml`) → `model` from the
recipe (an ultralytics config such as `yolov8n.yaml`, built offline with random weights) →
ultralytics' trainer (its losses, augmentation, schedule; its validation picks the best epoch) →
the best weights pickle-free (`detector/`: config .yaml + safetensors + class names, see
`vla.models.dclip.detector`), ultralytics' results.csv, and in the manifest ultralytics' own
final validation metrics (mAP50, mAP50-95, precision, recall).

Ultralytics keeps its own resume state as a pickle; an interrupted run is started again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from vla.artifacts import Artifact, ArtifactBuilder, claim_out, open_artifact
from vla.errors import StageError, UserError
from vla.models.dclip.detector import DETECTOR_DIR, TRAIN_DETECTOR_KIND

KIND = TRAIN_DETECTOR_KIND
# ultralytics' names for its final validation metrics → the manifest's
METRICS = {"metrics/mAP50(B)": "mAP50", "metrics/mAP50-95(B)": "mAP50-95",
           "metrics/precision(B)": "precision", "metrics/recall(B)": "recall"}


@dataclass
class TrainDetectorRecipe:
    model: str = "yolov8n.yaml"     # an ultralytics model config (random init, offline)
    epochs: int = 30
    imgsz: int = 64                 # training and validation image size (the world's images are 64 px)
    batch: int = 32
    seed: int = 0
    workers: int = 0                # ultralytics data-loader workers
    device: str = ""                # ultralytics' device string; "" lets it choose (a GPU when there is one)
    overrides: dict[str, Any] = field(default_factory=dict)  # any other ultralytics train argument

    def __post_init__(self) -> None:
        if not self.model.endswith((".yaml", ".yml")):
            raise UserError(f"model {self.model!r} must be an ultralytics model config (e.g. yolov8n.yaml); "
                            f"a trained .pt goes straight to `vla precompute-regions --detector`")
        for name in ("epochs", "imgsz", "batch"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.workers < 0 or self.seed < 0:
            raise UserError("workers and seed must be 0 or more")
        reserved = {"data", "epochs", "imgsz", "batch", "seed", "workers", "device", "project", "name",
                    "exist_ok", "resume", "model"} & set(self.overrides)
        if reserved:
            raise UserError(f"overrides.{sorted(reserved)[0]} is set by vla; use the recipe's own key or option")
        if isinstance(self.overrides.get("pretrained"), str):  # ultralytics would unpickle it unrestricted
            raise UserError(f"overrides.pretrained={self.overrides['pretrained']!r}: ultralytics loads a weights file "
                            f"by running its pickle; vla trains from the model config only: drop it")


def yolo_data_yaml(data: Path) -> tuple[Path, dict]:
    """A synth artifact's YOLO copy, or an ultralytics data.yaml given directly."""
    data = Path(data)
    if (data / "manifest.json").exists():
        art = open_artifact(data, "synth", role="--data")
        path = art.path / "yolo" / "data.yaml"
        if not path.is_file():
            raise UserError(f"{data} has no YOLO copy (yolo/data.yaml); rebuild it with a newer `vla synth --force`")
        _refuse_download_script(path)
        return path, {"data": art}
    if data.suffix in (".yaml", ".yml") and data.is_file():
        from vla.artifacts import sha256_file

        _refuse_download_script(data)
        return data, {"data": {"path": str(data), "kind": "yolo-data", "digest": sha256_file(data)}}
    raise UserError(f"--data {data} is neither a synth artifact nor an ultralytics data .yaml; make the world "
                    f"with `vla synth --out {data}` or pass the path of a YOLO data.yaml")


def _refuse_download_script(data_yaml: Path) -> None:
    """ultralytics runs a data.yaml's `download:` (Python, a shell command or a URL) when its
    images are missing: vla never lets a data file run code or fetch data."""
    import yaml

    try:
        spec = yaml.safe_load(data_yaml.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"{data_yaml} is not a readable YAML file ({type(err).__name__}); pass an ultralytics "
                        f"detection data.yaml") from None
    if not isinstance(spec, dict):
        raise UserError(f"{data_yaml} is not an ultralytics data.yaml (a mapping with path, train, val, names)")
    if spec.get("download"):
        raise UserError(f"{data_yaml} has a `download:` entry, which ultralytics would run (Python, a shell "
                        f"command or a URL) when the images are missing; fetch the data yourself and remove "
                        f"that entry")


def run(cfg: TrainDetectorRecipe, data: Path, out: Path, *, force: bool = False,
        command: Sequence[str] | None = None) -> Artifact:
    from vla.models.dclip.yolo import check_model_yaml, restricted_label_caches
    from vla.models.dclip.detector import save_yolo
    from vla.offline import import_ultralytics, torch_threads_kept

    claim_out(out, force=force, inputs={"data": data})
    data_yaml, inputs = yolo_data_yaml(data)
    ultralytics = import_ultralytics()
    if Path(cfg.model).is_file():  # ultralytics reads a local file before its own packaged configs
        check_model_yaml(Path(cfg.model))
    with ArtifactBuilder(out, KIND, recipe=cfg, inputs=inputs, force=force, command=command) as art:
        # absolute: ultralytics puts a relative `project` under its own runs_dir (its settings'
        # guess, e.g. the git repository's runs/), outside the artifact
        work = (art.dir / "ultralytics").resolve()
        shutil.rmtree(work, ignore_errors=True)  # a rerun after a crash trains again from the start
        with torch_threads_kept(), restricted_label_caches():
            model = ultralytics.YOLO(cfg.model, task="detect")
            try:
                model.train(data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch,
                            seed=cfg.seed, deterministic=True, workers=cfg.workers, device=cfg.device or None,
                            project=str(work), name="run", exist_ok=True, plots=False, verbose=False,
                            **cfg.overrides)
            except (SyntaxError, KeyError, ValueError) as err:  # ultralytics' answer to a bad argument
                raise UserError(f"ultralytics refused the recipe's arguments: {err}") from None
        metrics = getattr(model.trainer, "metrics", None) or {}
        if not metrics:
            raise StageError("ultralytics finished without validation metrics; check the data's val split")
        # after train() ultralytics holds the best epoch's weights (the final validation's model)
        save_yolo(model, art.dir / DETECTOR_DIR)
        results = work / "run" / "results.csv"
        if results.is_file():
            shutil.copy2(results, art.dir / "results.csv")
        shutil.rmtree(work)  # its weights are pickles: the artifact keeps only the safetensors copy
        art.metrics["val"] = {METRICS.get(k, k): float(v) for k, v in metrics.items()}
        art.counts["epochs"] = cfg.epochs
        art.extra["detector"] = {"arch": cfg.model, "classes": dict(model.model.names)}
    return art.artifact
