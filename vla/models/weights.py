"""Reading and writing state dicts without ever unpickling code.

vla writes safetensors only. It reads safetensors, and `.pt/.pth/.bin` checkpoints only through
`torch.load(weights_only=True)`, whose restricted unpickler refuses any object that is not a
tensor or a plain container — a checkpoint from the web can otherwise run arbitrary code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from vla.errors import UserError

_TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}


def load_state_dict(path: str | Path, *, fix: str | None = None) -> dict[str, Any]:
    """Load a checkpoint on the CPU: a safetensors file or a weights-only torch pickle. A damaged
    file (cut, empty, random bytes) is a UserError naming it and `fix` (what rebuilds it)."""
    path = Path(path)
    fix = fix or "replace it with an intact copy (re-download it, or rebuild the artifact that wrote it with --force)"
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a .safetensors or .pt file")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes); {fix}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"checkpoint {path} is damaged, not a whole safetensors file "
                            f"({(str(err).splitlines() or [type(err).__name__])[0]}); {fix}") from None
    if path.suffix not in _TORCH_SUFFIXES:
        raise UserError(
            f"checkpoint {path} has an unknown format; vla reads .safetensors or .pt/.pth/.bin/.ckpt files"
        )
    if not _torch_format(path):
        raise UserError(f"checkpoint {path} is damaged or not a torch checkpoint (neither torch's zip format nor "
                        f"its legacy pickle format); {fix}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise UserError(refused_pickle_message(path)) from err
        raise UserError(f"checkpoint {path} is damaged, not a torch checkpoint (invalid pickle data); {fix}") from None
    except (EOFError, RuntimeError) as err:  # a cut zip ("PytorchStreamReader failed ...") or pickle
        raise UserError(f"checkpoint {path} is damaged, not a whole torch checkpoint "
                        f"({(str(err).splitlines() or [type(err).__name__])[0]}); {fix}") from None
    except (IndexError, KeyError, ValueError, TypeError, AttributeError) as err:  # opcodes that make no sense
        raise UserError(f"checkpoint {path} is damaged ({type(err).__name__} while reading it); {fix}") from None


def _torch_format(path: Path) -> bool:
    """Whether `path` starts as a torch checkpoint does: a zip, or the legacy format's pickled magic number."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(4)
    return zipfile.is_zipfile(path) or head[:4] == b"\x80\x02\x8a\x0a"


def refused_pickle_message(path: Path) -> str:
    return (
        f"{path.name} contains pickled code, refused (vla loads only safetensors or weights-only "
        f"checkpoints); if you trust its source, convert it: python -c \"import torch, safetensors.torch as st; "
        f"sd = torch.load('{path}', weights_only=False); "
        f"st.save_file(sd.get('state_dict', sd), '{path.with_suffix('.safetensors')}')\""
    )


def save_state_dict(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors to safetensors: CPU, contiguous, every tensor its own storage.

    safetensors refuses tensors that share memory (tied embeddings, views), so each is cloned.
    """
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}
    save_file(tensors, str(path))
    # safetensors creates its file with mode 0600; weights are shared like any other output file
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
