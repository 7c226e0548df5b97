"""Plain-torch oracle for every public op: the definition of "correct" the Triton kernels are tested against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks


def channel_scores(h, weights=None, *, out=None):
    """[C] float32 (or into `out`): sum over all leading positions of weights * h.float()**2."""
    h = _checks.check_activations("h", h)
    _checks.check_weights(weights, h.shape[:-1], h.device)
    _checks.check_accumulator("out", out, h.shape[-1], h.device)
    return weighted_sum(squares(h), weights, out=out)


def squares(h, *, out=None):
    """h.float()**2 as float32 [T, C] (T: all leading positions), channel_scores' first step.

    `out` (float32 [T, C]) receives the squares instead of a fresh tensor; it may be h itself (float32), then
    squared in place: how a caller with reusable buffers squares without allocating."""
    rows = h.reshape(-1, h.shape[-1])
    if out is not None:
        return (out if out.data_ptr() == rows.data_ptr() else out.copy_(rows)).square_()
    if rows.dtype == torch.float32 or (torch.is_grad_enabled() and rows.requires_grad):
        return rows.float().square()
    return rows.float().square_()  # the upcast is a fresh copy: one [T, C] float32 temporary, not two


def weighted_sum(sq, weights=None, *, out=None):
    """sum_t weights_t * sq[t] for float32 squares sq [T, C] (weights: T values in any shape; None: ones):
    channel_scores' second step. [C] float32, or added into `out`."""
    total = sq.sum(0) if weights is None else weights.reshape(-1).float() @ sq
    return total if out is None else out.add_(total.to(out.dtype))


def token_weights(input_ids, table, attention_mask=None):
    """float32 like `input_ids`: table[ids] * mask (mask of 1 where None)."""
    _checks.check_token_weights(input_ids, table, attention_mask)
    w = table.float()[input_ids.long()]
    if attention_mask is not None:
        w = w * attention_mask.float()
    return w


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The GLU activation, computed as Hugging Face models do (in the input dtype)."""
    if name == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh")


def glu_and_score(gate, up=None, *, activation="silu", weights=None, scores=None):
    """h = act(gate) * up in the input dtype; adds sum_t w_t * h_t**2 into `scores` when given."""
    _checks.check_activation_name(activation)
    gate, up = _checks.split_glu(gate, up)
    _checks.check_weights(weights, gate.shape[:-1], gate.device)
    _checks.check_accumulator("scores", scores, gate.shape[-1], gate.device)
    h = apply_activation(gate, activation)  # a fresh tensor: multiply in place unless autograd needs it
    h = h * up if torch.is_grad_enabled() and (h.requires_grad or up.requires_grad) else h.mul_(up)
    if scores is not None:
        channel_scores(h, weights, out=scores)
    return h


def gather_rows(weight, index):
    """weight[index]: an exact copy of the indexed rows."""
    weight = _checks.check_matrix("weight", weight)
    _checks.check_index("index", index, weight.shape[0], weight.device)
    return weight.index_select(0, index)


def gather_cols(weight, index):
    """weight[:, index]: an exact copy of the indexed columns."""
    weight = _checks.check_matrix("weight", weight)
    _checks.check_index("index", index, weight.shape[1], weight.device)
    return weight.index_select(1, index)
