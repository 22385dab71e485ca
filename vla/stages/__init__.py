"""One module per subcommand; each reads top to bottom as the stage's story:
inputs → models → loss → loop → outputs.

`RECIPES` maps a recipe's `kind:` (the command's name) to its typed config, and `stage_run` gives
the stage's `run`; entries are import paths so that `vla --help` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

RECIPES: dict[str, str] = {
    "synth": "vla.data.synth:SynthConfig",
    "pretrain": "vla.stages.pretrain:PretrainRecipe",
    "eval": "vla.stages.evaluate:EvalRecipe",
    "distill": "vla.stages.distill:DistillRecipe",
    "contrast-tune": "vla.stages.contrast_tune:ContrastTuneRecipe",
    "train-detector": "vla.stages.train_detector:TrainDetectorRecipe",
    "precompute-regions": "vla.stages.precompute_regions:PrecomputeRegionsRecipe",
    "train-teacher": "vla.stages.train_teacher:TrainTeacherRecipe",
    "train-student": "vla.stages.train_student:TrainStudentRecipe",
    "eval-teacher": "vla.stages.eval_teacher:EvalTeacherRecipe",
    "pretrain-lm": "vla.stages.pretrain_lm:PretrainLMRecipe",
    "joint-train": "vla.stages.joint_train:JointTrainRecipe",
    "stage2-roi": "vla.stages.stage2_roi:Stage2RoiRecipe",
    "export": "vla.stages.export:ExportRecipe",
}


#: the stage module of each kind whose `run` is not beside its recipe class
STAGE_MODULES: dict[str, str] = {"synth": "vla.stages.synth"}


def recipe_class(kind: str) -> Any:
    from vla.errors import UserError

    if kind not in RECIPES:
        raise UserError(f"unknown recipe kind '{kind}'; known kinds: {', '.join(sorted(RECIPES))}")
    module, name = RECIPES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def stage_run(kind: str) -> Any:
    """The `run(cfg, ..., out, force=, command=)` of the stage `kind` (a key of RECIPES)."""
    recipe_class(kind)  # an unknown kind is a one-line error
    module = STAGE_MODULES.get(kind) or RECIPES[kind].split(":")[0]
    return importlib.import_module(module).run
