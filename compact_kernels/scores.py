"""Score accumulation: `channel_scores` and the GLU act-and-mul fused with it (`glu_and_score`).

Both run in two stages so the result is bit-identical run to run and across GPU models: stage 1 gives each
program a fixed contiguous range of rows and one fixed-width column tile and writes an fp32 partial sum per
program; stage 2 adds the partials in program order (in the accumulator's dtype) into the output. No atomics.
The grid and every reduction order follow from the shape alone (never from the device's SM count), the tile
configuration is fixed (no autotuning), and FMA contraction is off, so the arithmetic is the same on any GPU
and any Triton version.

Why this configuration (`CONFIG`), in bytes, for a Llama-3.1-8B FFN activation on an H200 (bf16
[16 x 2048, 14336], 0.94 GB; HBM ~4.8 TB/s by the datasheet, 4.27 TB/s measured as a copy; ~0.6-0.8 us
latency; 132 SMs): to keep HBM busy every SM needs about 4.8e12 B/s x 0.7e-6 s / 132 = ~25 KB of loads in
flight. A 32 x 128 bf16 tile is 8 KB, 32 B (two 16-byte loads) per thread of an 8-warp program;
`tl.range(..., num_stages=3)` copies the next two tiles (cp.async, 16 KB of shared memory) while the current one
is reduced, so each program keeps ~16-24 KB in flight, and the grid (about `Config.target_programs` programs:
19 row ranges x 112 column tiles = 2128 here, ~16 per SM) lets every SM switch between several. Each program
reads 1728 rows x 256 B = 0.44 MB and writes 512 B of partials; stage 2 reads 19 x 14336 x 4 B = 1.1 MB, 0.1%
of stage 1. Measured on an H200 (bench/sweep_scores.py, bench/results/sweep_scores.csv): channel_scores 0.243 ms
= 3.87 TB/s (91% of the measured copy bandwidth, 81% of the datasheet's); 4 warps ran 2% faster but spill
registers in three variants on sm_80/sm_90 (compile_check); 4 stages spill too; no pipelining ran at 86%.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import _checks


@dataclass(frozen=True)
class Config:
    """Launch configuration of the score kernels (fixed: results must not depend on tuning)."""

    block_t: int = 32       # rows per inner step
    block_c: int = 128      # channels per program (fixed width, never the whole row)
    num_warps: int = 8
    num_stages: int = 3     # software-pipelined row loop: loads of later steps in flight
    target_programs: int = 2048  # programs aimed at in all (stage 1), from the shape alone


CONFIG = Config()
BLOCK_C = CONFIG.block_c  # stage 2's column width
ACT_IDS = {"silu": 0, "gelu_tanh": 1}
COMPILE = _checks.COMPILE


@triton.jit
def _row_offsets(rows, d1, s0, s1, FLAT: tl.constexpr):
    """Element offsets (int64) of rows t = i0 * d1 + i1 of a tensor with leading strides s0, s1; FLAT (one
    stride s1 for all rows, as for any contiguous tensor) needs no 64-bit division."""
    rows = rows.to(tl.int64)
    if FLAT:
        return rows * s1
    return (rows // d1) * s0 + (rows % d1) * s1


@triton.jit
def _act(g, ACT: tl.constexpr, EXACT: tl.constexpr):
    """silu, or tanh-approximated gelu. On a GPU (EXACT) both are torch's own formulas with libdevice's expf /
    tanhf and IEEE division, so h matches torch's `act(gate) * up` bit for bit (Triton's fast exp and division
    left 157 of 8.4M fp16 silu values 1 ulp off on an H200). The interpreter has no libdevice: it computes the
    same functions, gelu as g * sigmoid(2y) (= 0.5 g (1 + tanh y), without cancellation)."""
    if EXACT:
        if ACT == 0:
            return tl.math.div_rn(g, 1.0 + libdevice.exp(-g))
        inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))
        return 0.5 * g * (1.0 + libdevice.tanh(inner))
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
def _tile(T, C, rows_per_prog, BLOCK_C: tl.constexpr):
    """(this program's columns, their mask, its first row, its row end): axis 1 tiles the C channels by BLOCK_C,
    axis 0 the T rows by rows_per_prog."""
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = tl.program_id(0) * rows_per_prog
    return cols, cols < C, start, tl.minimum(start + rows_per_prog, T)


@triton.jit
def _channel_scores_kernel(h_ptr, w_ptr, part_ptr, T, C, d1, s0, s1, sc, rows_per_prog,
                           HAS_W: tl.constexpr, FLAT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                           STAGES: tl.constexpr):
    cols, cmask, start, end = _tile(T, C, rows_per_prog, BLOCK_C)
    col_off = cols.to(tl.int64) * sc
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for r in tl.range(start, end, BLOCK_T, num_stages=STAGES):
        rows = r + tl.arange(0, BLOCK_T)
        rmask = rows < end
        offs = _row_offsets(rows, d1, s0, s1, FLAT)[:, None] + col_off[None, :]
        x = tl.load(h_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        acc += _weighted_squares(x, w_ptr, rows, rmask, HAS_W)
    tl.store(part_ptr + tl.program_id(0) * C + cols, tl.sum(acc, axis=0), mask=cmask)


@triton.jit
def _glu_kernel(g_ptr, u_ptr, h_ptr, w_ptr, part_ptr, T, C, d1, gs0, gs1, gsc, us0, us1, usc, rows_per_prog,
                ACT: tl.constexpr, SCORE: tl.constexpr, HAS_W: tl.constexpr, FLAT: tl.constexpr,
                EXACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    cols, cmask, start, end = _tile(T, C, rows_per_prog, BLOCK_C)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for r in tl.range(start, end, BLOCK_T, num_stages=STAGES):
        rows = r + tl.arange(0, BLOCK_T)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + _row_offsets(rows, d1, gs0, gs1, FLAT)[:, None] + (cols64 * gsc)[None, :], mask=mask,
                    other=0.0)
        u = tl.load(u_ptr + _row_offsets(rows, d1, us0, us1, FLAT)[:, None] + (cols64 * usc)[None, :], mask=mask,
                    other=0.0)
        # Round like torch's `act(gate) * up` in the input dtype: once after act, once after the product.
        a = _act(g.to(tl.float32), ACT, EXACT).to(h_ptr.dtype.element_ty).to(tl.float32)
        h = (a * u.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * C + cols64[None, :], h, mask=mask)
        if SCORE:
            acc += _weighted_squares(h.to(tl.float32), w_ptr, rows, rmask, HAS_W)
    if SCORE:
        tl.store(part_ptr + tl.program_id(0) * C + cols, tl.sum(acc, axis=0), mask=cmask)


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


def row_programs(rows: int, col_blocks: int, config: Config = CONFIG) -> tuple[int, int]:
    """(programs along rows, rows per program) from the shape alone: about `target_programs` programs in all,
    each a multiple of `block_t` rows; so the partial sums, and their order, are the same on every device."""
    progs = max(1, min(triton.cdiv(config.target_programs, col_blocks), triton.cdiv(rows, config.block_t)))
    per_prog = triton.cdiv(triton.cdiv(rows, progs), config.block_t) * config.block_t
    return triton.cdiv(rows, per_prog), per_prog


def _flat(rows: int, d1: int, strides) -> bool:
    """One stride for all rows in every tensor: no leading dim split (d0 == 1) or s0 == d1 * s1."""
    return rows == d1 or all(s0 == d1 * s1 for s0, s1, _ in strides)


def _flat_weights(weights, device):
    return None if weights is None else weights.reshape(-1).to(device=device, dtype=torch.float32).contiguous()


def _finish(partials: torch.Tensor, out, channels: int, device) -> torch.Tensor:
    """Stage 2: add the per-program partials, in order, into `out` (a fresh fp32 [C] when None)."""
    accumulate = out is not None
    if out is None:
        out = torch.empty(channels, dtype=torch.float32, device=device)
    grid = (triton.cdiv(channels, BLOCK_C),)
    _reduce_partials_kernel[grid](partials, out, partials.shape[0], channels, ACCUMULATE=accumulate, BLOCK_C=BLOCK_C,
                                  **COMPILE)
    return out


def channel_scores(h, weights=None, *, out=None, config: Config | None = None):
    """Triton `channel_scores`; see compact_kernels.reference.channel_scores. `config` is for benchmarks."""
    h = _checks.check_activations("h", h)
    _checks.check_weights(weights, h.shape[:-1], h.device)
    _checks.check_accumulator("out", out, h.shape[-1], h.device)
    channels = h.shape[-1]
    (h,), rows, d1, [(s0, s1, sc)] = _checks.row_layout(h)
    if rows == 0 or channels == 0:
        return torch.zeros(channels, dtype=torch.float32, device=h.device) if out is None else out
    cfg = config or CONFIG
    col_blocks = triton.cdiv(channels, cfg.block_c)
    progs, per_prog = row_programs(rows, col_blocks, cfg)
    partials = torch.empty(progs, channels, dtype=torch.float32, device=h.device)
    w = _flat_weights(weights, h.device)
    _channel_scores_kernel[(progs, col_blocks)](
        h, w, partials, rows, channels, d1, s0, s1, sc, per_prog,
        HAS_W=w is not None, FLAT=_flat(rows, d1, [(s0, s1, sc)]), BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c,
        STAGES=cfg.num_stages, num_warps=cfg.num_warps, **COMPILE)
    return _finish(partials, out, channels, h.device)


def glu_and_score(gate, up=None, *, activation="silu", weights=None, scores=None, config: Config | None = None):
    """Triton `glu_and_score`; see compact_kernels.reference.glu_and_score. `config` is for benchmarks."""
    _checks.check_activation_name(activation)
    gate, up = _checks.split_glu(gate, up)
    _checks.check_weights(weights, gate.shape[:-1], gate.device)
    _checks.check_accumulator("scores", scores, gate.shape[-1], gate.device)
    lead, channels, device = gate.shape[:-1], gate.shape[-1], gate.device
    h = torch.empty(*lead, channels, dtype=gate.dtype, device=device)
    (gate, up), rows, d1, [gs, us] = _checks.row_layout(gate, up)
    if rows == 0 or channels == 0:
        return h
    cfg = config or CONFIG
    col_blocks = triton.cdiv(channels, cfg.block_c)
    progs, per_prog = row_programs(rows, col_blocks, cfg)
    score = scores is not None
    partials = torch.empty(progs if score else 0, channels, dtype=torch.float32, device=device)
    w = _flat_weights(weights, device) if score else None
    _glu_kernel[(progs, col_blocks)](
        gate, up, h, w, partials, rows, channels, d1, *gs, *us, per_prog,
        ACT=ACT_IDS[activation], SCORE=score, HAS_W=w is not None, FLAT=_flat(rows, d1, [gs, us]), EXACT=gate.is_cuda,
        BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, STAGES=cfg.num_stages, num_warps=cfg.num_warps, **COMPILE)
    if score:
        _finish(partials, scores, channels, device)
    return h
