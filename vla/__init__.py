"""vla — vision-language alignment curricula as staged, reproducible commands."""

__version__ = "0.1.0"


def load(path):
    """Load an export (or a ProCLIP / CLIP artifact) for inference.

    `model.encode_image(img)` and `model.encode_text(text)` take one item or a list (images may
    also be a (N, 3, H, W) tensor from `model.preprocess`) and return a (N, D) float32
    L2-normalised matrix, as open_clip does; `repr(model)` shows its towers, dimensions and
    lineage. A missing directory is a `vla.errors.UserError` saying so. See vla/models/load.py."""
    from vla.models.load import load as _load

    return _load(path)
