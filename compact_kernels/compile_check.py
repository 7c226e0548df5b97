"""Ahead-of-time compile of every kernel variant the wrappers launch, for real NVIDIA targets, with no GPU.

Each variant is specialized exactly as a launch would specialize it (the kernel's own argument binder is fed
stand-in tensors with the right dtype and a 16-byte aligned address, and the ints and constexprs the wrapper
passes), compiled with `triton.compile` for sm_80 / sm_90 (ptxas ships in the Triton wheel), then the
bundled ptxas is rerun with `-v` for registers, spills and stack. From the PTX: whether the main tile loads
are 128-bit vector loads, and whether any 64-bit integer division or remainder is left (none may remain in
the contiguous variants, which are what models produce).

What this guarantees without a GPU: the kernels compile for Ampere and Hopper, keep everything in registers,
load their tiles 16 bytes per access (plain vector loads, or the 16-byte `cp.async` copies of a pipelined loop), and compute contiguous offsets without division. What only a GPU run
shows: achieved bandwidth, latency hiding, and bit-exactness against torch (bench/gpu_check.sh).

It relies on Triton internals (`create_function_from_signature`, `JITFunction._pack_args`, written against
Triton 3.9); `available()` says why it cannot run on another Triton.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton

from . import gather, scores, weights

# The launch shape the variants are specialized for: a Llama-3.1-8B FFN activation [16 x 2048, 14336],
# hidden 4096, 10752 kept channels (multiples of 16, as --ffn-multiple 64 gives; one odd width below).
ROWS, INTER, HIDDEN, KEPT = 16 * 2048, 14336, 4096, 10752
ARCHS = (80, 90)
SIZE = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4, torch.float64: 8, torch.int32: 4, torch.int64: 8}


class Stand:
    """What a launch reads from a tensor: its dtype and a (16-byte aligned) address."""

    def __init__(self, dtype: torch.dtype, ptr: int = 1 << 21):
        self.dtype, self._ptr = dtype, ptr

    def data_ptr(self) -> int:
        return self._ptr


@dataclass
class Variant:
    kernel: str
    fn: object
    name: str
    args: tuple
    consts: dict          # constexprs and launch options (num_warps, enable_fp_fusion)
    vector_bytes: int     # bytes each thread loads per main tile: 16-byte loads must cover them (0 = none)
    flat: bool = True     # contiguous offsets: no 64-bit division allowed


def _score_variants() -> list[Variant]:
    cfg = scores.CONFIG
    col_blocks = triton.cdiv(INTER, cfg.block_c)
    progs, per_prog = scores.row_programs(ROWS, col_blocks)
    threads = cfg.num_warps * 32
    common = dict(BLOCK_T=cfg.block_t, BLOCK_C=cfg.block_c, STAGES=cfg.num_stages, num_warps=cfg.num_warps,
                  **scores.COMPILE)
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        tile = cfg.block_t * cfg.block_c * SIZE[dtype] // threads
        for flat in (True, False):
            for has_w in (False, True):
                s0 = 0 if flat else 2 * 2048 * INTER  # split leading dims with a gap: the general path
                out.append(Variant(
                    "channel_scores", scores._channel_scores_kernel,
                    f"{str(dtype)[6:]} weights={has_w} flat={flat}",
                    (Stand(dtype), Stand(torch.float32) if has_w else None, Stand(torch.float32), ROWS, INTER,
                     ROWS if flat else 2048, s0, INTER, 1, per_prog),
                    dict(HAS_W=has_w, FLAT=flat, **common), tile, flat))
        for act, act_id in scores.ACT_IDS.items():
            for score, has_w in ((False, False), (True, False), (True, True)):
                out.append(Variant(
                    "glu_and_score", scores._glu_kernel, f"{str(dtype)[6:]} {act} score={score} weights={has_w}",
                    (Stand(dtype), Stand(dtype, (1 << 21) + INTER * SIZE[dtype]), Stand(dtype),
                     Stand(torch.float32) if has_w else None, Stand(torch.float32), ROWS, INTER, ROWS,
                     0, 2 * INTER, 1, 0, 2 * INTER, 1, per_prog),
                    dict(ACT=act_id, SCORE=score, HAS_W=has_w, FLAT=True, EXACT=True, **common), 2 * tile))
    progs, _ = scores.row_programs(ROWS, col_blocks)
    for out_dtype, accumulate in ((torch.float32, False), (torch.float32, True), (torch.float64, True)):
        out.append(Variant("reduce_partials", scores._reduce_partials_kernel,
                           f"out={str(out_dtype)[6:]} accumulate={accumulate}",
                           (Stand(torch.float32), Stand(out_dtype), progs, INTER),
                           dict(ACCUMULATE=accumulate, BLOCK_C=scores.BLOCK_C, **scores.COMPILE), 0))
    return out


def _other_variants() -> list[Variant]:
    out = []
    for ids in (torch.int32, torch.int64):
        for has_mask in (False, True):
            out.append(Variant("token_weights", weights._token_weights_kernel, f"ids={str(ids)[6:]} mask={has_mask}",
                               (Stand(ids), Stand(torch.float32), Stand(torch.float32) if has_mask else None,
                                Stand(torch.float32), ROWS),
                               dict(HAS_MASK=has_mask, BLOCK=weights.BLOCK, **scores.COMPILE), 0))
    for name, config in gather.CONFIGS.items():
        # the launched shapes in every dtype, the others the sweep tries in bf16 only
        launched = config in (gather.ROWS, gather.COLS)
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64) if launched else (torch.bfloat16,):
            consts = dict(BLOCK_R=config.block_r, BLOCK_D=config.block_d, num_warps=config.num_warps,
                          **scores.COMPILE)
            per_thread = config.block_r * config.block_d // (config.num_warps * 32) * SIZE[dtype]
            out.append(Variant("gather_rows", gather._gather_kernel, f"{name} {str(dtype)[6:]}",
                               (Stand(dtype), Stand(torch.int64), Stand(dtype), KEPT, HIDDEN, HIDDEN, 1),
                               dict(GATHER_COLS=False, **consts), per_thread))
            for kept in (KEPT, KEPT + 1) if launched else (KEPT,):  # --ffn-multiple 1: an odd width
                out.append(Variant("gather_cols", gather._gather_kernel, f"{name} {str(dtype)[6:]} kept={kept}",
                                   (Stand(dtype), Stand(torch.int64), Stand(dtype), HIDDEN, kept, INTER, 1),
                                   dict(GATHER_COLS=True, **consts),
                                   0))  # a column gather loads element by element by nature
    return out


def variants() -> list[Variant]:
    """Every kernel variant the wrappers launch (dtype, flags, activation, accumulator, layout, odd width)."""
    return _score_variants() + _other_variants()


class InternalsDiffer(RuntimeError):
    """This Triton specializes launches differently from the one the check was written against (3.9)."""


def available() -> str | None:
    """None when this Triton can compile ahead of time here, else the reason it cannot."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError as e:
        return f"Triton {triton.__version__} lacks an ahead-of-time compile internal ({e})"
    if not hasattr(scores._channel_scores_kernel, "_pack_args"):
        return f"Triton {triton.__version__}: JITFunction has no _pack_args (written against Triton 3.9)"
    return None


PTX_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[busf](\d+)\b")
PTX_ASYNC_16 = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\b[^;]*,\s*(?:0x10|16)\b")  # pipelined 16-byte copies
PTX_I64_DIV = re.compile(r"\b(?:div|rem)\.[su]64\b")
PTX_LOCAL = re.compile(r"\b(?:ld|st)\.local\b")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile `v` for sm_`arch` as a launch would; registers, spills, stack, 16-byte loads, 64-bit divisions."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # The keywords a launch passes the binder besides the kernel's own (as JITFunction.run does, Triton 3.9).
    extra = {k: getattr(knobs.compilation, k) for k in ("instrumentation_mode", "fpsan_homomorphic_casts")
             if hasattr(knobs.compilation, k)}
    kwargs = dict(v.consts, debug=bool(knobs.runtime.debug), **extra)
    try:  # the launch's own specialization: Triton internals that differ between versions
        binder = create_function_from_signature(v.fn.signature, v.fn.params, backend)
        bound, spec, opts = binder(*v.args, **kwargs)
        options, signature, constexprs, attrs = v.fn._pack_args(backend, kwargs, bound, spec, opts)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        raise InternalsDiffer(f"Triton {triton.__version__}'s launch internals differ ({type(e).__name__}: {e})") from e
    compiled = triton.compile(ASTSource(fn=v.fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", *([] if options.enable_fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(arch)}", path, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    loads = [int(vec or 1) * int(bits) // 8 for vec, bits in PTX_LOAD.findall(ptx)]
    loads += [16] * len(PTX_ASYNC_16.findall(ptx))
    stack, spill_st, spill_ld = map(int, PTXAS_SPILL.search(log).groups())
    return {"registers": int(PTXAS_REGS.search(log).group(1)), "spill_bytes": spill_st + spill_ld,
            "stack_bytes": stack, "local_accesses": len(PTX_LOCAL.findall(ptx)),
            "shared_bytes": compiled.metadata.shared, "loads_16B": loads.count(16),
            "vectorized": 16 * loads.count(16) >= v.vector_bytes, "i64_div": len(PTX_I64_DIV.findall(ptx)),
            "fma": "fma.rn.f32" in ptx}


def problems(v: Variant, r: dict) -> list[str]:
    """What a variant's compile result violates (empty: fine)."""
    bad = []
    if r["spill_bytes"] or r["stack_bytes"] or r["local_accesses"]:
        bad.append(f"spills ({r['spill_bytes']} B, stack {r['stack_bytes']} B)")
    if not r["vectorized"]:
        bad.append(f"main loads not 16-byte vectors ({r['loads_16B']} x 16 B < {v.vector_bytes} B per thread)")
    if v.flat and r["i64_div"]:
        bad.append(f"{r['i64_div']} 64-bit div/rem")
    if v.consts.get("enable_fp_fusion") is False and r["fma"]:
        bad.append("FMA contraction although fp fusion is off")
    return bad


def run(archs=ARCHS) -> list[tuple[Variant, int, dict]]:
    """Compile every variant for every arch: [(variant, arch, result)]."""
    return [(v, arch, compile_variant(v, arch)) for arch in archs for v in variants()]


TABLE_HEAD = ("kernel", "variant", "arch", "regs", "spill B", "stack B", "smem B", "16-B loads", "i64 div/rem", "")


def table_rows(results) -> list[tuple]:
    """One row per (variant, arch) under TABLE_HEAD; the last cell lists the problems, or says ok."""
    return [(v.kernel, v.name, f"sm_{arch}", r["registers"], r["spill_bytes"], r["stack_bytes"], r["shared_bytes"],
             f"{r['loads_16B']}" + ("" if v.vector_bytes == 0 else " ok" if r["vectorized"] else " NO"),
             r["i64_div"], "; ".join(problems(v, r)) or "ok") for v, arch, r in results]


def main() -> int:
    """Print the table for sm_80 and sm_90; exit 1 when any variant has a problem (2 when this Triton cannot)."""
    reason = available()
    try:
        results = [] if reason else run()
    except InternalsDiffer as e:
        reason = str(e)
    if reason:
        print(f"compile check not run: {reason}")
        return 2
    cells = [TABLE_HEAD, *[tuple(str(c) for c in row) for row in table_rows(results)]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_HEAD))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    bad = sum(bool(problems(v, r)) for v, _, r in results)
    print(f"triton {triton.__version__}: {len(results)} variant compiles (sm_{' / sm_'.join(map(str, ARCHS))}), "
          f"{bad} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter replaces the kernels it compiles")
    raise SystemExit(main())
