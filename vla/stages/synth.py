"""`vla synth`: the embedded synthetic world as an artifact.

Inputs: none but the recipe (a seed and sizes). Outputs: train/val/test shards in img2dataset's
layout, evaluation sets in CLIP_benchmark's WebDataset layout, a YOLO copy, and in the manifest
the world's counts and its long-text property.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from vla.artifacts import Artifact, ArtifactBuilder, claim_out
from vla.data.synth import SynthConfig, generate_world
from vla.errors import StageError

KIND = "synth"


#: the test-split size from which the long-text property is enforced
PROPERTY_MIN_TEST = 50


def run(cfg: SynthConfig, out: Path, *, force: bool = False, command: Sequence[str] | None = None) -> Artifact:
    claim_out(out, force=force)
    with ArtifactBuilder(out, KIND, recipe=cfg, force=force, command=command) as art:
        # Generation is fast and deterministic, so a rerun after a crash starts it again.
        for child in art.dir.iterdir():
            if child.name != "resume.json":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        world = art.dir / "world"  # generate_world wants an empty directory of its own
        world.mkdir()
        result = generate_world(world, cfg)
        for child in world.iterdir():
            child.rename(art.dir / child.name)
        world.rmdir()
        art.counts.update(result["counts"])
        art.metrics.update(result["metrics"])
        frac = art.metrics.get("long_text_prefix_ambiguous_fraction")
        # a fraction over a handful of test images is chance, not a property: tiny test worlds
        # record it but are not refused (the embedded world has 1,000, the smoke one 64)
        if frac is not None and frac < 0.5 and cfg.n_test >= PROPERTY_MIN_TEST:
            raise StageError(f"the generated world fails its long-text property (the first "
                             f"{cfg.context_length} tokens of a long caption match several test images "
                             f"in only {frac:.0%} of cases, < 50%); use a larger n_test")
    return art.artifact
