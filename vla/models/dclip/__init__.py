"""DCLIP's models: the region-aware meta-teacher and the frozen CLIP it reads (`teacher`), the
region detector `--detector` names (`detector`: the oracle, vla's own YOLO weights, a user's
`.pt`) over ultralytics' detectors (`yolo`), and the student image tower's variants
(`vision_variants`). `vla.models.dclip` re-exports `teacher`'s public names."""

from vla.models.dclip.teacher import (CLIP_KINDS, CONFIG_FILE, FUSIONS, POOL_TEMPERATURE, MetaTeacher, TeacherConfig,
                                      attention_pool, clip_text_states, epoch_file, load_dclip_clip, load_teacher,
                                      region_weights, save_teacher)

__all__ = ["CLIP_KINDS", "CONFIG_FILE", "FUSIONS", "POOL_TEMPERATURE", "MetaTeacher", "TeacherConfig", "attention_pool",
           "clip_text_states", "epoch_file", "load_dclip_clip", "load_teacher", "region_weights", "save_teacher"]
