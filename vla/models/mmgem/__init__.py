"""MM-GEM's models: one causal LM that embeds and captions, with an open_clip image tower and the
projections h1-h4 (`model`), built from names, saved and loaded (`io`), the region pooling
(`pool_aggregator`), the causal LMs it is built on (`causal_lm`), and what the training loop
trains for each stage: the model with its loss (`objective`). `vla.models.mmgem` re-exports the
public names of `model` and `io`."""

from vla.models.mmgem.io import (CONFIG_FILE, FORMAT, FORMAT_VERSION, LM_DIR, WEIGHTS_FILE, build_mmgem, load_mmgem,
                                 save_mmgem)
from vla.models.mmgem.model import (IGNORE_INDEX, MMGEM, MMGEMConfig, VisionTower, greedy_decode_without_cache,
                                    identity_linear)

__all__ = ["CONFIG_FILE", "FORMAT", "FORMAT_VERSION", "IGNORE_INDEX", "LM_DIR", "MMGEM", "WEIGHTS_FILE", "MMGEMConfig",
           "VisionTower", "build_mmgem", "greedy_decode_without_cache", "identity_linear", "load_mmgem", "save_mmgem"]
