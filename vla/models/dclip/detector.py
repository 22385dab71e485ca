"""DCLIP's region detector as `--detector` names it, and vla's own detector weights on disk.

`--detector` is one of:
- `oracle`: no model — the data's own boxes (the synthetic world's exact ones) are the regions;
- a `train-detector` artifact: vla's trained YOLO, stored without pickles (below);
- anything `vla.models.dclip.yolo.load_detector` takes: a user's ultralytics `.pt` on disk (loaded
  as ultralytics loads it; its sha256 is recorded), an alias (`yolov8x`) or a model `.yaml`.

vla's own YOLO weights are `detector/<arch>.yaml` (the model's own config dict, its class count
included: ultralytics builds the model from it, offline, and takes the scale n/s/m/l/x from the
file name as it does for its packaged configs), `detector/weights.safetensors` (the state dict)
and `detector/names.json` (class index → name). Reloading runs no pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vla.errors import UserError

ORACLE = "oracle"
TRAIN_DETECTOR_KIND = "train-detector"
DETECTOR_DIR = "detector"
WEIGHTS_FILE = "weights.safetensors"
NAMES_FILE = "names.json"


def save_yolo(model: Any, out_dir: Path) -> Path:
    """Write an ultralytics YOLO's config, weights (fp32) and class names, pickle-free."""
    import yaml

    from vla.models.weights import save_state_dict

    net = model.model
    cfg = dict(net.yaml)
    stem = Path(str(cfg.get("yaml_file") or "yolov8n.yaml")).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    save_state_dict({k: v.float() if v.is_floating_point() else v for k, v in net.state_dict().items()},
                    out_dir / WEIGHTS_FILE)
    (out_dir / NAMES_FILE).write_text(json.dumps({str(k): v for k, v in dict(net.names).items()}, indent=1) + "\n")
    return out_dir


def load_yolo_dir(directory: Path) -> Any:
    """The YOLO `save_yolo` wrote, built from its config and loaded from safetensors."""
    from vla.models.dclip.yolo import check_model_yaml
    from vla.models.weights import load_state_dict
    from vla.offline import import_ultralytics, torch_threads_kept

    configs = sorted(directory.glob("*.yaml"))
    if len(configs) != 1 or not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"{directory} lacks its model .yaml or {WEIGHTS_FILE}; rebuild the detector with "
                        f"`vla train-detector --force`")
    ultralytics = import_ultralytics()
    check_model_yaml(configs[0])
    with torch_threads_kept():
        model = ultralytics.YOLO(str(configs[0]), task="detect")
    fix = "rebuild the detector with `vla train-detector --force`"
    try:
        model.model.load_state_dict(load_state_dict(directory / WEIGHTS_FILE, fix=fix))
        names = json.loads((directory / NAMES_FILE).read_text())
    except (RuntimeError, OSError, ValueError) as err:  # weights of another shape, a missing or cut names.json
        raise UserError(f"{directory} does not load ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                        f"{fix}") from None
    model.model.names = {int(k): v for k, v in names.items()}
    model.model.float().eval()
    return model


@dataclass
class RegionDetector:
    """A resolved `--detector`: the YOLO (None for the oracle) and what the manifest records."""

    model: Any | None
    reference: dict[str, Any]

    @property
    def is_oracle(self) -> bool:
        return self.model is None


def resolve_detector(ref: str) -> RegionDetector:
    """`--detector` → a RegionDetector; UserError, before any compute, for what cannot be had."""
    from vla.artifacts import open_artifact, sha256_file
    from vla.models.dclip.yolo import load_detector

    if ref == ORACLE:
        return RegionDetector(None, {"path": ORACLE, "kind": "oracle"})
    path = Path(ref).expanduser()
    if path.is_dir():
        art = open_artifact(path, TRAIN_DETECTOR_KIND, role="--detector")
        return RegionDetector(load_yolo_dir(art.path / DETECTOR_DIR), art.reference())
    model = load_detector(ref)  # refuses a .pt that is not on disk, and any other kind of name
    reference: dict[str, Any] = {"path": ref, "kind": "detector"}
    if path.is_file():
        reference.update(path=str(path), sha256=sha256_file(path))
    return RegionDetector(model, reference)
