"""Triton kernels for COMPACT pruning, each with a plain-torch reference (`compact_kernels.reference`).

Backend: CUDA tensors run the Triton kernels; CPU tensors run the reference, unless
COMPACT_KERNELS_BACKEND=triton and TRITON_INTERPRET=1 (how the tests run the kernels on CPU).
COMPACT_KERNELS_BACKEND=torch forces the reference everywhere.
"""
from __future__ import annotations

import importlib
import os

import torch

from . import reference
from ._checks import check_weights  # the validation every op applies to `weights`, for callers that fuse ops

__all__ = ["channel_scores", "token_weights", "glu_and_score", "gather_rows", "gather_cols", "backend_for",
           "check_weights", "reference"]
__version__ = "0.1.0"

_BACKENDS = ("auto", "triton", "torch")


def backend_for(*tensors) -> str:
    """"triton" or "torch": the backend a call with these tensors runs on (see the module docstring)."""
    choice = os.environ.get("COMPACT_KERNELS_BACKEND", "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"COMPACT_KERNELS_BACKEND must be one of {', '.join(_BACKENDS)}, got {choice!r}")
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if choice == "torch" or not present:
        return "torch"
    if all(t.is_cuda for t in present):
        return "triton"
    return "triton" if choice == "triton" and os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def _impl(family: str, name: str, *tensors):
    if backend_for(*tensors) == "torch":
        return getattr(reference, name)
    return getattr(importlib.import_module(f"{__name__}.{family}"), name)


def channel_scores(h, weights=None, *, out=None):
    """[C] float32 (or added into `out`, float32/float64 [C]): sum over leading positions of weights * h.float()**2."""
    return _impl("scores", "channel_scores", h)(h, weights, out=out)


def token_weights(input_ids, table, attention_mask=None):
    """float32 shaped like input_ids: table[input_ids] * attention_mask."""
    return _impl("weights", "token_weights", input_ids)(input_ids, table, attention_mask)


def glu_and_score(gate, up=None, *, activation="silu", weights=None, scores=None):
    """h = act(gate) * up in the input dtype (up=None: gate is a fused [..., 2I] tensor, gate half first).

    With `scores` (float32/float64 [I]) also adds sum_t weights_t * h_t**2 into it, in the same pass.
    """
    return _impl("scores", "glu_and_score", gate)(gate, up, activation=activation, weights=weights, scores=scores)


def gather_rows(weight, index):
    """weight[index] (exact copy); IndexError before any launch when an index is out of range."""
    return _impl("gather", "gather_rows", weight)(weight, index)


def gather_cols(weight, index):
    """weight[:, index] (exact copy); IndexError before any launch when an index is out of range."""
    return _impl("gather", "gather_cols", weight)(weight, index)
