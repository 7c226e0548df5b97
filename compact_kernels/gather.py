"""Gather-based slicing: exact copies of indexed rows (embedding / LM head / FFN rows) or columns (down_proj)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _checks


@dataclass(frozen=True)
class Config:
    """A launch shape: `block_r` output rows x `block_d` output columns per program, on `num_warps` warps."""

    block_r: int
    block_d: int
    num_warps: int = 4


# The launch shapes bench/bench_gather.py sweeps on a GPU, beside torch's index_select (rows `triton-<name>` in
# bench/results/gather.csv). ROWS and COLS are what gather_rows and gather_cols launch: 16 x 256 until a GPU run
# shows another to be faster (at 16 x 256 the H200 measured 0.365 ms for gather_rows and 0.205 ms for gather_cols,
# against index_select's 0.285 and 0.129 ms).
CONFIGS = {
    "16x256": Config(16, 256),
    "1x2048w8": Config(1, 2048, 8),  # one long row per program: 16 bytes per thread in bf16
    "4x1024w8": Config(4, 1024, 8),
    "8x512": Config(8, 512),
    "32x128": Config(32, 128),
}
ROWS = COLS = CONFIGS["16x256"]


@triton.jit
def _gather_kernel(src_ptr, idx_ptr, dst_ptr, R, D, s0, s1, GATHER_COLS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[r, d] = src[idx[r], d] (rows) or src[r, idx[d]] (columns); dst is contiguous [R, D]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    cmask = cols < D
    if GATHER_COLS:
        src_r = rows.to(tl.int64)
        src_c = tl.load(idx_ptr + cols, mask=cmask, other=0).to(tl.int64)
    else:
        src_r = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
        src_c = cols.to(tl.int64)
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(src_ptr + src_r[:, None] * s0 + src_c[None, :] * s1, mask=mask)
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * D + cols.to(tl.int64)[None, :], x, mask=mask)


def launch(weight, index, gather_cols: bool, config: Config):
    """The gather with launch shape `config`, unchecked (gather_rows and gather_cols check, then launch)."""
    rows, cols = (weight.shape[0], index.numel()) if gather_cols else (index.numel(), weight.shape[1])
    out = torch.empty(rows, cols, dtype=weight.dtype, device=weight.device)
    if out.numel():
        grid = (triton.cdiv(rows, config.block_r), triton.cdiv(cols, config.block_d))
        _gather_kernel[grid](weight, index.contiguous(), out, rows, cols, weight.stride(0), weight.stride(1),
                             GATHER_COLS=gather_cols, BLOCK_R=config.block_r, BLOCK_D=config.block_d,
                             num_warps=config.num_warps, **_checks.COMPILE)
    return out


def gather_rows(weight, index):
    """Triton `gather_rows`; see compact_kernels.reference.gather_rows."""
    weight = _checks.check_matrix("weight", weight)
    _checks.check_index("index", index, weight.shape[0], weight.device)
    return launch(weight, index, False, ROWS)


def gather_cols(weight, index):
    """Triton `gather_cols`; see compact_kernels.reference.gather_cols."""
    weight = _checks.check_matrix("weight", weight)
    _checks.check_index("index", index, weight.shape[1], weight.device)
    return launch(weight, index, True, COLS)
