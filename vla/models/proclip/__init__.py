"""ProCLIP's models: the adapter g on an LLM embedder Φ (`adapter`), the image-text aligner and the
inference model a ProCLIP export loads into (`model`), and the EMA self-distillation teacher
(`ema`). `vla.models.proclip` re-exports `model`'s public names."""

from vla.models.proclip.model import (ImageTextAligner, ProCLIPModel, embedder_from_spec, frozen_text_features,
                                      load_adapter, load_proclip_dir, save_adapter)

__all__ = ["ImageTextAligner", "ProCLIPModel", "embedder_from_spec", "frozen_text_features", "load_adapter",
           "load_proclip_dir", "save_adapter"]
