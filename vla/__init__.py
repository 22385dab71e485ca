"""vla — vision-language alignment curricula as staged, reproducible commands."""

__version__ = "0.1.0"


def load(path):
    """Load an export (or a ProCLIP / CLIP artifact): `.encode_image`, `.encode_text`,
    `.preprocess`, `.tokenize`. See vla/export.py."""
    from vla.export import load as _load

    return _load(path)
