"""Token-weight lookup: w_t = table[ids_t] * mask_t, the per-position weight of common act^2."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks

BLOCK = 1024


@triton.jit
def _token_weights_kernel(ids_ptr, table_ptr, mask_ptr, out_ptr, N, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    ids = tl.load(ids_ptr + offs, mask=valid, other=0).to(tl.int64)
    w = tl.load(table_ptr + ids, mask=valid, other=0.0)
    if HAS_MASK:
        w = w * tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)
    tl.store(out_ptr + offs, w, mask=valid)


def token_weights(input_ids, table, attention_mask=None):
    """Triton `token_weights`; see compact_kernels.reference.token_weights."""
    _checks.check_token_weights(input_ids, table, attention_mask)
    out = torch.empty(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    n = input_ids.numel()
    if n == 0:
        return out
    ids = input_ids.reshape(-1).contiguous()
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32).contiguous()
    _token_weights_kernel[(triton.cdiv(n, BLOCK),)](
        ids, table.to(torch.float32).contiguous(), mask, out, n, HAS_MASK=mask is not None, BLOCK=BLOCK,
        **_checks.COMPILE)
    return out
