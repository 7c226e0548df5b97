"""Run every public kernel against its plain-torch reference on a fixed seeded input: the `compact check` table."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class CheckRow:
    op: str
    case: str
    backend: str
    max_abs: float
    max_rel: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tol


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double().cpu(), b.double().cpu()
    diff = (a - b).abs()
    scale = b.abs().clamp_min(b.abs().max().clamp_min(1e-30) * 1e-3)
    return float(diff.max()), float((diff / scale).max())


def _cases(device: torch.device, dtype: torch.dtype):
    """(op, case, fast thunk, reference thunk, relative tolerance) for every public op."""
    import compact_kernels as ck
    from compact_kernels import reference as ref

    gen = torch.Generator().manual_seed(0)
    tokens, inter, vocab = 257, 300, 1000

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    h, g, u = rand(2, tokens, inter), rand(2, tokens, inter), rand(2, tokens, inter)
    ids = torch.randint(0, vocab, (2, tokens), generator=gen).to(device)
    table = (torch.rand(vocab, generator=gen) > 0.25).float().to(device)
    w = ref.token_weights(ids, table)
    emb = rand(vocab, 96)
    keep = torch.randperm(vocab, generator=gen)[:600].sort().values.to(device)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]

    def glu(fn, fused):
        s = torch.zeros(inter, dtype=torch.float64, device=device)
        if fused:
            fn(torch.cat([g, u], -1), activation="gelu_tanh", weights=w, scores=s)
        else:
            fn(g, u, activation="silu", weights=w, scores=s)
        return s

    return [
        ("token_weights", f"ids {tuple(ids.shape)}", lambda: ck.token_weights(ids, table), lambda: w, 0.0),
        ("channel_scores", f"h {tuple(h.shape)}", lambda: ck.channel_scores(h, w), lambda: ref.channel_scores(h, w), 1e-5),
        ("glu_and_score", "silu, split", lambda: glu(ck.glu_and_score, False), lambda: glu(ref.glu_and_score, False), 4 * tol),
        ("glu_and_score", "gelu_tanh, fused", lambda: glu(ck.glu_and_score, True), lambda: glu(ref.glu_and_score, True), 4 * tol),
        ("gather_rows", f"{tuple(emb.shape)} -> 600 rows", lambda: ck.gather_rows(emb, keep), lambda: emb[keep], 0.0),
        ("gather_cols", f"{tuple(h[0].shape)} -> 200 cols", lambda: ck.gather_cols(h[0], keep[:200] % inter),
         lambda: h[0][:, keep[:200] % inter], 0.0),
    ]


def run_kernel_check(dtype: torch.dtype = torch.bfloat16, device: str | None = None) -> list[CheckRow]:
    """Check every op; on CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("COMPACT_KERNELS_BACKEND", "triton")
    import compact_kernels as ck

    rows = []
    for op, case, fast, slow, tol in _cases(device, dtype):
        got, want = fast(), slow()
        max_abs, max_rel = _rel(got, want)
        backend = ck.backend_for(got)
        if backend == "triton" and not got.is_cuda:
            backend = "triton (CPU interpreter)"
        rows.append(CheckRow(op, f"{case} {str(dtype).removeprefix('torch.')}", backend, max_abs, max_rel, tol))
    return rows


CHECK_HEAD = ("op", "case", "backend", "max |diff|", "max rel", "tolerance", "")


def check_table_rows(rows: list[CheckRow]) -> list[tuple]:
    """One row per check under CHECK_HEAD."""
    return [(r.op, r.case, r.backend, f"{r.max_abs:.3g}", f"{r.max_rel:.3g}",
             "exact" if r.tol == 0 else f"{r.tol:g}", "ok" if r.ok else "FAIL") for r in rows]
