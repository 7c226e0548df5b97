"""Gather-based slicing: exact copies of indexed rows (embedding / LM head / FFN rows) or columns (down_proj)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks

BLOCK_R = 16
BLOCK_D = 256


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


def _gather(weight, index, gather_cols: bool):
    rows, cols = (weight.shape[0], index.numel()) if gather_cols else (index.numel(), weight.shape[1])
    out = torch.empty(rows, cols, dtype=weight.dtype, device=weight.device)
    if out.numel():
        grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(cols, BLOCK_D))
        _gather_kernel[grid](weight, index.contiguous(), out, rows, cols, weight.stride(0), weight.stride(1),
                             GATHER_COLS=gather_cols, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, **_checks.COMPILE)
    return out


def gather_rows(weight, index):
    """Triton `gather_rows`; see compact_kernels.reference.gather_rows."""
    weight = _checks.check_matrix("weight", weight)
    _checks.check_index("index", index, weight.shape[0], weight.device)
    return _gather(weight, index, gather_cols=False)


def gather_cols(weight, index):
    """Triton `gather_cols`; see compact_kernels.reference.gather_cols."""
    weight = _checks.check_matrix("weight", weight)
    _checks.check_index("index", index, weight.shape[1], weight.device)
    return _gather(weight, index, gather_cols=True)
