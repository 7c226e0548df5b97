"""Memory figures of this process: resident set size and its peak (Linux /proc), the GPU allocator's peak, and
handing freed heap pages back to the system (glibc malloc_trim). Used by evaluation, `--offload layerwise` and
the benchmarks."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

_LIBC = None


def trim_host_memory() -> None:
    """glibc raises its mmap threshold after large frees, so large host buffers end up on the heap and are kept
    after they are freed (RSS grows, and a later peak hides). malloc_trim returns them; a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _proc_bytes(path: str, key: str) -> int | None:
    """A size field (in kB there) of a /proc file, in bytes, or None where unavailable."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _status_bytes(key: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM) in bytes, or None where unavailable."""
    return _proc_bytes("/proc/self/status", key)


def host_available() -> int:
    """Bytes of host memory available now (MemAvailable; all physical pages where /proc is absent)."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if available is None else available


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss (VmHWM), else since the process started (ru_maxrss)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def work_memory(device: torch.device):
    """Yields a dict that holds, on exit, `work_memory_bytes`: the peak memory of the block above what was in use
    when it began (the GPU allocator's peak on CUDA; peak RSS on a CPU, or None where the peak cannot be reset),
    so one model's figure does not include an earlier model's peak."""
    result = {"work_memory_kind": "GPU max_memory_allocated" if device.type == "cuda" else "peak RSS"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        import gc

        gc.collect()
        trim_host_memory()  # pages an earlier model freed would otherwise hide this block's peak
        base = rss_bytes() if reset_peak_rss() else None
    yield result
    if device.type == "cuda":
        result["work_memory_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        result["work_memory_bytes"] = None if base is None else max(peak_rss_bytes() - base, 0)
