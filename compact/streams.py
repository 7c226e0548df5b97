"""The calibration streams between layers: every calibration token's hidden state at a layer boundary, one
stream (the unpruned model's) or two (and the pruned model's, for the sequential re-fit).

They live where they fit, chosen from their size before the run: device memory (a GPU, when they fit beside a
few layers' room), host memory (up to `host_limit` bytes: by default half the memory available), else a disk
memmap in `folder`. Each stream is one [rows, length, hidden] tensor in the model dtype; a batch reads and
writes its rows. The values are the same wherever they live: only the copies differ.

Cost per token per stream, in bf16: 2 x hidden bytes (8 KiB for an 8B model, hidden 4096; 16 KiB for 70B); on
disk each layer reads and writes every stream once (for an 8B with the default 16 x 2048 tokens: 256 MiB per
stream per layer).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from .memory import host_available

WHERE = ("device", "host", "disk")
_CHUNK = 1 << 26  # bytes per copy between a stream and a file: bounded host memory for any stream size
_RAW = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # numpy has no bf16: stored as raw bits
_RAW_TORCH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def place(nbytes: int, device: torch.device, *, reserve: int = 0, host_limit: int | None = None) -> str:
    """Where streams of `nbytes` go: "device" (a CUDA device with room for them and `reserve` bytes more),
    "host" (within `host_limit`; None: half the available memory) or "disk"."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes + reserve < 0.9 * free:
            return "device"
    limit = host_available() // 2 if host_limit is None else host_limit
    return "host" if nbytes <= limit else "disk"


class Streams:
    """`count` streams of shape `shape` ([rows, length, hidden]) in `dtype`, in `where` (one of WHERE); a disk
    stream is a memmap file in `folder` (a temporary folder when None), removed by `close`."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, count: int, *, where: str,
                 device: torch.device, folder: str | Path | None = None):
        if where not in WHERE:
            raise ValueError(f"streams live in one of {', '.join(WHERE)}, got {where!r}")
        self.shape, self.dtype, self.where = tuple(shape), dtype, where
        self.device = device if where == "device" else torch.device("cpu")
        self._files: list[Path] = []
        self._folder = None
        if where == "disk":
            self._folder = Path(tempfile.mkdtemp(prefix="compact-streams-", dir=folder))
        self.data = [self._allocate(k) for k in range(count)]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize * len(self.data)

    def describe(self) -> str:
        """The progress line's words: where the streams are and how large."""
        place_ = "disk " + str(self._folder) if self.where == "disk" else self.where
        return f"{len(self.data)} stream{'s' * (len(self.data) > 1)} in {place_}, {self.nbytes / 2**20:,.1f} MiB"

    def _allocate(self, k: int) -> torch.Tensor:
        if self.where != "disk":
            return torch.empty(self.shape, dtype=self.dtype, device=self.device)
        path = self._folder / f"stream{k}.bin"
        self._files.append(path)
        raw = np.memmap(path, dtype=_RAW[self.dtype.itemsize], mode="w+", shape=self.shape)
        return torch.from_numpy(raw).view(self.dtype)

    def rows(self, k: int, rows: slice) -> torch.Tensor:
        """Stream k's rows (a view)."""
        return self.data[k][rows]

    def put(self, k: int, rows: slice, value: torch.Tensor) -> None:
        """Stream k's rows set to `value`."""
        self.data[k][rows].copy_(value)

    def copy(self, source: int, target: int) -> None:
        """Stream `target` set to stream `source`, a chunk at a time."""
        for rows in self._chunks():
            self.data[target][rows].copy_(self.data[source][rows])

    def save(self, folder: Path) -> None:
        """Each stream as raw bits, `stream{k}.bin` in `folder`, a chunk at a time. Written by the file object itself:
        numpy's `tofile` turns a SIGTERM's or SIGINT's exception raised during its flush into a TypeError."""
        for k, stream in enumerate(self.data):
            with open(folder / f"stream{k}.bin", "wb") as f:
                for rows in self._chunks():
                    f.write(_raw(stream[rows].cpu()).data)

    def load(self, folder: Path) -> None:
        """Each stream from `save`'s files in `folder`."""
        for k, stream in enumerate(self.data):
            raw = np.memmap(folder / f"stream{k}.bin", dtype=_RAW[self.dtype.itemsize], mode="r", shape=self.shape)
            for rows in self._chunks():
                stream[rows].copy_(torch.from_numpy(np.array(raw[rows])).view(self.dtype))
            del raw

    def _chunks(self):
        row_bytes = max(math.prod(self.shape[1:]) * self.dtype.itemsize, 1)
        step = max(_CHUNK // row_bytes, 1)
        return (slice(start, start + step) for start in range(0, self.shape[0], step))

    def close(self) -> None:
        """Free the streams (and their files)."""
        self.data = []
        for path in self._files:
            path.unlink(missing_ok=True)
        if self._folder is not None:
            self._folder.rmdir()
            self._folder = None
        self._files = []


def _raw(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bits as a contiguous numpy array of unsigned integers (any dtype, bfloat16 too)."""
    return tensor.contiguous().view(_RAW_TORCH[tensor.itemsize]).numpy()
