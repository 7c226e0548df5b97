"""Score accumulation: `channel_scores` and the GLU act-and-mul fused with it (`glu_and_score`).

Both run in two stages so the result is bit-identical run to run: stage 1 gives each program a fixed
contiguous range of rows and one fixed-width column tile and writes an fp32 partial sum per program;
stage 2 adds the partials in program order (in the accumulator's dtype) into the output. No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks

BLOCK_T = 32   # rows per inner step
BLOCK_C = 128  # channels per program (fixed width, never the whole row)
ACT_IDS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _row_offsets(rows, d1, s0, s1):
    """Element offsets (int64) of rows t = i0 * d1 + i1 of a tensor with leading strides s0, s1."""
    rows = rows.to(tl.int64)
    return (rows // d1) * s0 + (rows % d1) * s1


@triton.jit
def _act(g, ACT: tl.constexpr):
    """silu, or tanh-approximated gelu written as g * sigmoid(2y) (= 0.5 g (1 + tanh y), without cancellation)."""
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    y2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)
    return g / (1.0 + tl.exp(-y2))


@triton.jit
def _weighted_squares(x, w_ptr, rows, rmask, HAS_W: tl.constexpr):
    """w_t * x**2 for an fp32 [BLOCK_T, BLOCK_C] tile (w = 1 without weights; masked rows get weight 0)."""
    x = x * x
    if HAS_W:
        x = x * tl.load(w_ptr + rows, mask=rmask, other=0.0)[:, None]
    return x


@triton.jit
def _channel_scores_kernel(h_ptr, w_ptr, part_ptr, T, C, d1, s0, s1, sc, rows_per_prog,
                           HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * sc
    start = pid_t * rows_per_prog
    end = tl.minimum(start + rows_per_prog, T)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for r in range(start, end, BLOCK_T):
        rows = r + tl.arange(0, BLOCK_T)
        rmask = rows < end
        offs = _row_offsets(rows, d1, s0, s1)[:, None] + col_off[None, :]
        x = tl.load(h_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += _weighted_squares(x, w_ptr, rows, rmask, HAS_W)
    tl.store(part_ptr + pid_t * C + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _glu_kernel(g_ptr, u_ptr, h_ptr, w_ptr, part_ptr, T, C, d1, gs0, gs1, gsc, us0, us1, usc, rows_per_prog,
                ACT: tl.constexpr, SCORE: tl.constexpr, HAS_W: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    cols64 = cols.to(tl.int64)
    start = pid_t * rows_per_prog
    end = tl.minimum(start + rows_per_prog, T)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for r in range(start, end, BLOCK_T):
        rows = r + tl.arange(0, BLOCK_T)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + _row_offsets(rows, d1, gs0, gs1)[:, None] + (cols64 * gsc)[None, :], mask=mask, other=0.0)
        u = tl.load(u_ptr + _row_offsets(rows, d1, us0, us1)[:, None] + (cols64 * usc)[None, :], mask=mask, other=0.0)
        # Round like torch's `act(gate) * up` in the input dtype: once after act, once after the product.
        a = _act(g.to(tl.float32), ACT).to(h_ptr.dtype.element_ty).to(tl.float32)
        h = (a * u.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * C + cols64[None, :], h, mask=mask)
        if SCORE:
            acc += _weighted_squares(h.to(tl.float32), w_ptr, rows, rmask, HAS_W)
    if SCORE:
        tl.store(part_ptr + pid_t * C + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _reduce_partials_kernel(part_ptr, out_ptr, P, C, ACCUMULATE: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_ty = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_C,), dtype=acc_ty)
    for p in range(0, P):
        total += tl.load(part_ptr + p * C + cols, mask=cmask, other=0.0).to(acc_ty)
    if ACCUMULATE:
        total = tl.load(out_ptr + cols, mask=cmask, other=0.0) + total
    tl.store(out_ptr + cols, total, mask=cmask)


def _row_programs(rows: int, col_blocks: int, device: torch.device) -> tuple[int, int]:
    """(programs along rows, rows per program): enough programs to fill the device, each a multiple of BLOCK_T rows."""
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    progs = max(1, min(triton.cdiv(target, col_blocks), triton.cdiv(rows, BLOCK_T)))
    per_prog = triton.cdiv(triton.cdiv(rows, progs), BLOCK_T) * BLOCK_T
    return triton.cdiv(rows, per_prog), per_prog


def _flat_weights(weights, device):
    return None if weights is None else weights.reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def _finish(partials: torch.Tensor, out, channels: int, device) -> torch.Tensor:
    """Stage 2: add the per-program partials, in order, into `out` (a fresh fp32 [C] when None)."""
    accumulate = out is not None
    if out is None:
        out = torch.empty(channels, dtype=torch.float32, device=device)
    grid = (triton.cdiv(channels, BLOCK_C),)
    _reduce_partials_kernel[grid](partials, out, partials.shape[0], channels, ACCUMULATE=accumulate, BLOCK_C=BLOCK_C)
    return out


def channel_scores(h, weights=None, *, out=None):
    """Triton `channel_scores`; see compact_kernels.reference.channel_scores."""
    h = _checks.check_activations("h", h)
    _checks.check_weights(weights, h.shape[:-1], h.device)
    _checks.check_accumulator("out", out, h.shape[-1], h.device)
    channels = h.shape[-1]
    (h,), rows, d1, [(s0, s1, sc)] = _checks.row_layout(h)
    if rows == 0 or channels == 0:
        return torch.zeros(channels, dtype=torch.float32, device=h.device) if out is None else out
    col_blocks = triton.cdiv(channels, BLOCK_C)
    progs, per_prog = _row_programs(rows, col_blocks, h.device)
    partials = torch.empty(progs, channels, dtype=torch.float32, device=h.device)
    w = _flat_weights(weights, h.device)
    _channel_scores_kernel[(progs, col_blocks)](
        h, w, partials, rows, channels, d1, s0, s1, sc, per_prog,
        HAS_W=w is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return _finish(partials, out, channels, h.device)


def glu_and_score(gate, up=None, *, activation="silu", weights=None, scores=None):
    """Triton `glu_and_score`; see compact_kernels.reference.glu_and_score."""
    _checks.check_activation_name(activation)
    gate, up = _checks.split_glu(gate, up)
    _checks.check_weights(weights, gate.shape[:-1], gate.device)
    _checks.check_accumulator("scores", scores, gate.shape[-1], gate.device)
    lead, channels, device = gate.shape[:-1], gate.shape[-1], gate.device
    h = torch.empty(*lead, channels, dtype=gate.dtype, device=device)
    (gate, up), rows, d1, [gs, us] = _checks.row_layout(gate, up)
    if rows == 0 or channels == 0:
        return h
    col_blocks = triton.cdiv(channels, BLOCK_C)
    progs, per_prog = _row_programs(rows, col_blocks, device)
    score = scores is not None
    partials = torch.empty(progs if score else 0, channels, dtype=torch.float32, device=device)
    w = _flat_weights(weights, device) if score else None
    _glu_kernel[(progs, col_blocks)](
        gate, up, h, w, partials, rows, channels, d1, *gs, *us, per_prog,
        ACT=ACT_IDS[activation], SCORE=score, HAS_W=w is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    if score:
        _finish(partials, scores, channels, device)
    return h
