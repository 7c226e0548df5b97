"""Slicing kernels against torch indexing (CUDA only).

gather_rows on embedding-shaped matrices (keep half the rows), gather_cols on a down_proj-shaped matrix
(keep 75 % of the columns): Triton (what gather_rows/gather_cols launch, and every launch shape in
compact_kernels.gather.CONFIGS as `triton-<name>`) vs index_select vs advanced indexing. Bytes: read + write of
the kept part.
Run: python bench/bench_gather.py [--quick] [--out DIR] [--no-plot]
"""
from __future__ import annotations

import torch

import common
import compact_kernels as ck
from compact_kernels import gather

DTYPE = torch.bfloat16
# (matrix shape, gathered dim): Llama 3 and Qwen2.5-0.5B embeddings (rows), Llama-3.1-8B down_proj (columns).
FULL = [((128256, 4096), 0), ((151936, 896), 0), ((4096, 14336), 1)]
QUICK = [((128256, 4096), 0), ((4096, 14336), 1)]
KEEP = {0: 0.5, 1: 0.75}  # share of rows / columns kept
KERNELS = {0: ("gather_rows", ck.gather_rows), 1: ("gather_cols", ck.gather_cols)}
CONFIGS = gather.CONFIGS


def _keep(n: int, share: float, device) -> torch.Tensor:
    """A sorted random int64 subset of range(n), as a pruning selection is."""
    return torch.randperm(n, device=device)[: int(n * share)].sort().values


def gather_case(shape: tuple[int, int], dim: int, device) -> common.Case:
    """Keep KEEP[dim] of the rows (dim 0) or columns (dim 1) of a `shape` matrix."""
    op, kernel = KERNELS[dim]
    kept = int(shape[dim] * KEEP[dim])

    def build():
        w = torch.randn(shape, dtype=DTYPE, device=device)
        idx = _keep(shape[dim], KEEP[dim], device)
        where = (idx,) if dim == 0 else (slice(None), idx)
        variants = {f"triton-{name}": (lambda c=config: gather.launch(w, idx, dim == 1, c))
                    for name, config in CONFIGS.items()}
        return {"triton": lambda: kernel(w, idx), **variants,
                "index_select": lambda: w.index_select(dim, idx),
                "indexing": lambda: w[where]}
    nbytes = 2 * kept * shape[1 - dim] * DTYPE.itemsize
    label = f"{shape[0]}x{shape[1]}->{kept} {('rows', 'cols')[dim]}"
    return common.Case(op, label, nbytes, build)


def cases(matrices, device="cuda"):
    """One case per (shape, dim); inputs are allocated only when a case is measured."""
    return (gather_case(shape, dim, device) for shape, dim in matrices)


if __name__ == "__main__":
    common.main("gather", lambda quick: cases(QUICK if quick else FULL))
