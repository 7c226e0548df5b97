"""Test setup: kernels run through the Triton interpreter on CPU unless a CUDA device is present."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is created

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def shared_data_dir() -> Path:
    """../shared/data beside the repository (or $COMPACT_SHARED_DATA)."""
    env = os.environ.get("COMPACT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set COMPACT_SHARED_DATA)")
    return path


@pytest.fixture
def device() -> str:
    return DEVICE
