"""Scoring kernels against the torch code they replace (CUDA only).

channel_scores: Triton vs hook-style torch vs torch.compile of the reference.
glu_and_score:  Triton fused act-and-mul + score vs the act-and-mul a model runs anyway (F.silu(g) * u),
                act-and-mul + hook-style scoring, and torch.compile of the reference.
token_weights:  Triton vs the eager reference.
Run: python bench/bench_scores.py [--quick] [--out DIR] [--no-plot]
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import common
import compact_kernels as ck
from compact_kernels import reference

DTYPE = torch.bfloat16
FULL = {"widths": (4864, 14336, 28672), "tokens": (4096, 16384, 65536)}  # FFN widths: Qwen2.5-0.5B, Llama-3.1-8B, -70B
QUICK = {"widths": (4864, 28672), "tokens": (16384,)}
VOCAB = 128256  # Llama 3 vocabulary, for token_weights
KEEP = 0.9  # share of positions with weight 1
MAX_GLU_BYTES = 40e9  # gate + up + h must fit in this much GPU memory


def hook_scores(h, w):
    """What a forward-pre-hook on down_proj computes."""
    return (h.float() ** 2 * w[..., None]).sum(dim=tuple(range(h.dim() - 1)))


def hook_glu(g, u, w, scores):
    """The model's act-and-mul, then hook-style scoring added into `scores`."""
    h = F.silu(g) * u
    scores.add_(hook_scores(h, w))
    return h


@functools.cache
def compiled(fn):
    """One torch.compile wrapper per function, shared by all shapes (dynamo recompiles per new shape only)."""
    return torch.compile(fn)


def _weights(tokens: int, device) -> torch.Tensor:
    return (torch.rand(tokens, device=device) < KEEP).float()


def fits(tokens: int, width: int) -> bool:
    """Whether gate, up and h of this shape fit in MAX_GLU_BYTES (says so when not)."""
    ok = 3 * tokens * width * DTYPE.itemsize <= MAX_GLU_BYTES
    if not ok:
        print(f"skip {tokens}x{width}: gate, up and h need more than {MAX_GLU_BYTES / 1e9:.0f} GB")
    return ok


def channel_scores_case(tokens: int, width: int, device) -> common.Case:
    def build():
        h = torch.randn(tokens, width, dtype=DTYPE, device=device)
        w = _weights(tokens, device)
        ref = compiled(reference.channel_scores)
        return {"triton": lambda: ck.channel_scores(h, w),
                "torch_hook": lambda: hook_scores(h, w),
                "torch_compile": lambda: ref(h, w)}
    nbytes = tokens * width * DTYPE.itemsize + tokens * 4
    return common.Case("channel_scores", f"{tokens}x{width}", nbytes, build, tokens=tokens, channels=width)


def glu_case(tokens: int, width: int, device) -> common.Case:
    def build():
        g, u = (torch.randn(tokens, width, dtype=DTYPE, device=device) for _ in range(2))
        w = _weights(tokens, device)
        scores = torch.zeros(width, dtype=torch.float32, device=device)
        ref = compiled(reference.glu_and_score)
        return {"triton": lambda: ck.glu_and_score(g, u, weights=w, scores=scores),
                "triton_glu_only": lambda: ck.glu_and_score(g, u),
                "torch_glu_only": lambda: F.silu(g) * u,
                "torch_hook": lambda: hook_glu(g, u, w, scores),
                "torch_compile": lambda: ref(g, u, weights=w, scores=scores)}
    nbytes = 3 * tokens * width * DTYPE.itemsize + tokens * 4  # read gate, up (+ weights); write h
    return common.Case("glu_and_score", f"{tokens}x{width}", nbytes, build, tokens=tokens, channels=width)


def token_weights_case(tokens: int, device) -> common.Case:
    def build():
        ids = torch.randint(0, VOCAB, (tokens,), device=device)
        table = (torch.rand(VOCAB, device=device) < KEEP).float()
        mask = torch.ones(tokens, dtype=torch.int64, device=device)
        return {"triton": lambda: ck.token_weights(ids, table, mask),
                "torch": lambda: reference.token_weights(ids, table, mask)}
    nbytes = tokens * (8 + 8 + 4) + VOCAB * 4  # int64 ids and mask, fp32 out; the table once
    return common.Case("token_weights", f"{tokens} ids", nbytes, build, dtype="int64", tokens=tokens)


def cases(widths, tokens, device="cuda"):
    """Every case, op by op; inputs are allocated only when a case is measured."""
    shapes = [(t, i) for i in widths for t in tokens if fits(t, i)]
    yield from (channel_scores_case(t, i, device) for t, i in shapes)
    yield from (glu_case(t, i, device) for t, i in shapes)
    yield from (token_weights_case(t, device) for t in tokens)


if __name__ == "__main__":
    common.main("scores", lambda quick: cases(**(QUICK if quick else FULL)))
