"""Slicing: shrink a model in place to the kept vocabulary rows and FFN channels, with the gather kernels.

Modules are edited in place (weights replaced, sizes updated) so subclasses such as Gemma's scaled
embedding keep their behaviour; the config and generation config follow.
"""
from __future__ import annotations

import torch
from torch import nn

import compact_kernels as ck

from . import models


def _index(ids, device) -> torch.Tensor:
    return torch.as_tensor(list(ids), dtype=torch.long, device=device)


def _set_weight(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


def slice_linear(linear: nn.Linear, index: torch.Tensor, *, dim: int) -> None:
    """Keep output rows (dim 0, with the bias) or input columns (dim 1) `index` of a Linear."""
    if dim == 0:
        _set_weight(linear, "weight", ck.gather_rows(linear.weight.data, index))
        if linear.bias is not None:
            _set_weight(linear, "bias", linear.bias.data.index_select(0, index))
        linear.out_features = index.numel()
    else:
        _set_weight(linear, "weight", ck.gather_cols(linear.weight.data, index))
        linear.in_features = index.numel()


def slice_vocabulary(model: nn.Module, kept_token_ids: list[int]) -> None:
    """Keep embedding (and untied LM-head) rows `kept_token_ids`; renumber config token ids."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = models.is_tied(model)
    index = _index(kept_token_ids, embedding.weight.device)
    _set_weight(embedding, "weight", ck.gather_rows(embedding.weight.data, index))
    embedding.num_embeddings = index.numel()
    new_id = {old: new for new, old in enumerate(kept_token_ids)}
    if embedding.padding_idx is not None:
        embedding.padding_idx = new_id.get(embedding.padding_idx)
    if head is not None:
        if tied:
            head.weight = embedding.weight
        else:
            slice_linear(head, index.to(head.weight.device), dim=0)
        head.out_features = index.numel()
    model.config.vocab_size = index.numel()
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            renumber_special_ids(config, new_id)


def renumber_special_ids(config, new_id: dict[int, int]) -> None:
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            setattr(config, attr, new_id.get(value))
        elif isinstance(value, (list, tuple)):
            setattr(config, attr, [new_id[v] for v in value if v in new_id] or None)


def slice_ffn(model: nn.Module, kept_channels: dict[str, list[int]]) -> None:
    """Keep FFN channels per MLP: gate/up rows (both halves of a fused gate_up_proj) and down_proj columns."""
    family = models.family_of(model.config)
    sizes = set()
    for name, mlp in models.mlps(model).items():
        index = _index(kept_channels[name], mlp.down_proj.weight.device)
        if family.fused_gate_up:
            slice_linear(mlp.gate_up_proj, torch.cat([index, index + mlp.down_proj.in_features]), dim=0)
        else:
            slice_linear(mlp.gate_proj, index, dim=0)
            slice_linear(mlp.up_proj, index, dim=0)
        slice_linear(mlp.down_proj, index, dim=1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = index.numel()
        sizes.add(index.numel())
    if len(sizes) != 1:
        raise ValueError(f"every layer must keep the same number of channels, got {sorted(sizes)}")
    model.config.intermediate_size = sizes.pop()
