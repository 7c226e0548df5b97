"""Test setup: kernels run through the Triton interpreter on CPU unless a CUDA device is present."""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit is created

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each, and in the processes they start (the CLI,
    # torchrun ranks), so that a worker's subprocess does not spin two OpenMP threads against the other worker,
    # whatever OMP_NUM_THREADS the run was given (the serial part, one process alone, keeps it)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


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


@dataclass(frozen=True)
class Compute:
    """Where a driver test computes: a device and a --dtype, as the CLI names them."""

    device: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.device}-{self.dtype}"

    @property
    def args(self) -> list[str]:
        return ["--device", self.device, "--dtype", self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def u(self) -> float:
        """The dtype's unit roundoff (2^-24 for float32, 2^-8 for bfloat16)."""
        return torch.finfo(self.torch_dtype).eps / 2


# The CPU always (what the suite has always run); with CUDA, the GPU in bf16 and fp32 as well.
COMPUTES = [Compute("cpu", "float32")] + ([Compute("cuda", "bfloat16"), Compute("cuda", "float32")]
                                          if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=COMPUTES, ids=str)
def compute(request) -> Compute:
    """Every device this machine has, one test run each: the driver's tests take it to catch device mismatches,
    dtype surprises and host syncs on a GPU (on a CPU-only machine, the one CPU run they always had)."""
    return request.param


@pytest.fixture(scope="session")
def stories(tmp_path_factory):
    """(checkpoint, calibration .npy, held-out .npy): token data sampled from the model itself, seeded."""
    ckpt = shared_data_dir() / "stories260K.bin"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is absent (set COMPACT_SHARED_DATA)")
    from compact.llama2c import load_llama2c

    model = load_llama2c(ckpt)
    torch.manual_seed(0)
    with torch.no_grad():
        ids = model.generate(torch.ones(24, 1, dtype=torch.long), do_sample=True, max_new_tokens=191,
                             min_new_tokens=191, pad_token_id=0)
    folder = tmp_path_factory.mktemp("stories")
    np.save(folder / "calib.npy", ids[:12].numpy())
    np.save(folder / "heldout.npy", ids[12:].numpy())
    return ckpt, folder / "calib.npy", folder / "heldout.npy"


def pytest_collection_modifyitems(items):
    """The modules holding a `slow` test first (stable otherwise). `make test` hands whole modules to its workers
    (`--dist loadfile`, so each module's fixtures are made once) in this order: the longest ones, the real-model tier's
    minutes among them, start first, and no worker idles at the end behind one of them."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
