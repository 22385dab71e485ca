"""Tests run offline on the CPU with tiny models and generated data."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("VLA_NO_PROGRESS", "1")

# Hermetic: the feature cache goes to a directory of this session, never the user's ~/.cache/vla
# (subprocesses inherit it; a test that needs its own sets VLA_CACHE_DIR itself).
os.environ["VLA_CACHE_DIR"] = tempfile.mkdtemp(prefix="vla-test-cache-")
atexit.register(shutil.rmtree, os.environ["VLA_CACHE_DIR"], True)

def pytest_collection_modifyitems(config, items):
    """`cuda`-marked tests need a GPU: skipped, saying so, where none is visible."""
    import pytest
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def cli(*args, code: int = 0):
    """`vla ARGS` in this process through Typer's CliRunner, each argument as the string a user
    types; asserts the exit code (0 unless `code` says otherwise) and returns the result."""
    from typer.testing import CliRunner

    from vla.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r
