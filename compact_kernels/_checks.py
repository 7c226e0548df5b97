"""Argument validation and stride bookkeeping shared by the reference and the Triton launchers.

Every public op validates here first, so both backends raise the same clear error before any work.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GATHER_DTYPES = FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)
ACTIVATIONS = ("silu", "gelu_tanh")
# Compile options of every Triton launch: FMA contraction off, so results do not change with Triton's default
# (which flips in 3.10) and the fp32 arithmetic rounds like the reference's separate multiply and add.
COMPILE = {"enable_fp_fusion": False}


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _same_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the data is on {device}")


def check_activations(name: str, h) -> torch.Tensor:
    """An activation tensor: fp32/bf16/fp16 with a channel (last) dimension."""
    h = _tensor(name, h)
    if h.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {h.dtype}")
    if h.dim() < 1:
        raise ValueError(f"{name} must have a channel (last) dimension, got a 0-d tensor")
    return h


def check_weights(weights, lead_shape: torch.Size, device: torch.device) -> None:
    """Per-position weights: real-valued, shaped like the activations without the channel dim."""
    if weights is None:
        return
    weights = _tensor("weights", weights)
    if weights.is_complex():
        raise TypeError(f"weights must be real-valued, got {weights.dtype}")
    if weights.shape != lead_shape:
        raise ValueError(f"weights must have shape {tuple(lead_shape)} (h.shape[:-1]), got {tuple(weights.shape)}")
    _same_device("weights", weights, device)


def check_accumulator(name: str, out, channels: int, device: torch.device) -> None:
    """An `out`/`scores` accumulator: float32 or float64, shape [C], on the data's device."""
    if out is None:
        return
    out = _tensor(name, out)
    if out.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {out.dtype}")
    if out.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), got {tuple(out.shape)}")
    _same_device(name, out, device)


def check_activation_name(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")


def split_glu(gate, up):
    """(gate, up) views; `up=None` means `gate` is a fused [..., 2I] tensor, gate half first."""
    gate = check_activations("gate", gate)
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"a fused gate_up tensor needs an even last dimension, got {gate.shape[-1]}")
        half = gate.shape[-1] // 2
        return gate[..., :half], gate[..., half:]
    up = check_activations("up", up)
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have the dtype of gate ({gate.dtype}), got {up.dtype}")
    _same_device("up", up, gate.device)
    return gate, up


def check_index(name: str, index, size: int, device: torch.device) -> None:
    """A 1-D int32/int64 index whose values all lie in [0, size); raises IndexError otherwise."""
    index = _tensor(name, index)
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(index.shape)}")
    _same_device(name, index, device)
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} holds {bad}, outside [0, {size})")


def check_matrix(name: str, weight) -> torch.Tensor:
    weight = _tensor(name, weight)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(weight.shape)}")
    if weight.dtype not in GATHER_DTYPES:
        raise TypeError(f"{name} must be a float tensor (fp32/bf16/fp16/fp64), got {weight.dtype}")
    return weight


def check_token_weights(input_ids, table, attention_mask) -> None:
    input_ids = _tensor("input_ids", input_ids)
    if input_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"input_ids must be int32 or int64, got {input_ids.dtype}")
    table = _tensor("table", table)
    if table.dim() != 1 or table.is_complex() or table.dtype == torch.bool:
        raise ValueError(f"table must be a 1-D real tensor, got {table.dtype} of shape {tuple(table.shape)}")
    _same_device("table", table, input_ids.device)
    if attention_mask is not None:
        attention_mask = _tensor("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}")
        _same_device("attention_mask", attention_mask, input_ids.device)
    check_index("input_ids", input_ids.reshape(-1), table.numel(), input_ids.device)


def row_layout(*tensors: torch.Tensor):
    """View the shared leading dims of `tensors` as rows t = i0 * d1 + i1 without copying.

    Adjacent leading dims merge when every tensor's strides allow it; if more than two dims remain,
    the tensors are made contiguous. Returns (tensors, rows, d1, [(stride0, stride1, stride_c) per tensor]).
    """
    lead = tensors[0].shape[:-1]
    dims: list[tuple[int, list[int]]] = []
    for i, size in enumerate(lead):
        if size == 1:
            continue
        strides = [t.stride(i) for t in tensors]
        if dims and all(prev == s * size for prev, s in zip(dims[-1][1], strides)):
            dims[-1] = (dims[-1][0] * size, strides)
        else:
            dims.append((size, strides))
    if len(dims) > 2:
        return row_layout(*(t.contiguous() for t in tensors))
    while len(dims) < 2:
        dims.insert(0, (1, [0] * len(tensors)))
    (d0, s0), (d1, s1) = dims
    strides = [(a, b, t.stride(-1)) for a, b, t in zip(s0, s1, tensors)]
    return tensors, d0 * d1, d1, strides
