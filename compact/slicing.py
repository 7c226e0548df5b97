"""Slicing: what a prune cuts (`Slices`), applied to a model in memory or (by `compact.layerwise_slicing`) to its
safetensors files tensor by tensor.

`slices_of` decides, from a model or its meta skeleton and the names of the tensors there are, which tensors lose
rows or columns and which indices they keep: embedding rows (and untied LM-head rows) `kept_token_ids`;
gate/up rows (both halves of Phi-3's fused gate_up_proj) and down_proj columns `kept_channels[mlp]`, the same
count in every layer. `slice_tensor` cuts one tensor with the gather kernels; `edit_configs` renumbers the
config's token ids and sizes. In memory, modules are edited in place (weights replaced, sizes updated), so
subclasses such as Gemma's scaled embedding keep their behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import compact_kernels as ck

from . import models


@dataclass
class Slices:
    """What a prune cuts: {tensor name: ("rows" | "cols", kept indices)} and the sizes before and after."""

    ops: dict[str, tuple[str, torch.Tensor]]
    vocab: int
    intermediate: int
    tied: bool
    kept_token_ids: list[int] | None
    ffn_keep: int | None  # channels kept per layer; None: FFN unchanged

    @property
    def vocab_after(self) -> int:
        return self.vocab if self.kept_token_ids is None else len(self.kept_token_ids)

    @property
    def intermediate_after(self) -> int:
        return self.intermediate if self.ffn_keep is None else self.ffn_keep

    @property
    def new_id(self) -> dict[int, int] | None:
        """Old token id -> new id (None: vocabulary unchanged)."""
        return None if self.kept_token_ids is None else {old: new for new, old in enumerate(self.kept_token_ids)}


def _ascending(ids, limit: int, what: str) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"{what} is empty")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"{what} must be ascending without repeats")
    if ids[0] < 0 or ids[-1] >= limit:
        raise IndexError(f"{what} holds {ids[0] if ids[0] < 0 else ids[-1]}, outside [0, {limit})")
    return ids


def slices_of(model: nn.Module, shapes: dict[str, tuple[int, ...]], kept_token_ids=None,
              kept_channels=None) -> Slices:
    """The slices of `model` (or its skeleton) whose tensors are `shapes` ({name: shape}, e.g. a checkpoint's)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_name = models.prefix_of(model, embedding) + "weight"
    if emb_name not in shapes:
        raise ValueError(f"the checkpoint lacks the embedding {emb_name}")
    vocab = shapes[emb_name][0]
    head_names = []
    if head is not None:
        head_prefix = models.prefix_of(model, head)
        head_names = [head_prefix + p for p, _ in head.named_parameters(recurse=False)
                      if head_prefix + p in shapes and head_prefix + p != emb_name]
    tied = not any(n.endswith("weight") for n in head_names)
    if tied and head is not None and not getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(f"the config says the LM head is not tied, but the checkpoint lacks {head_prefix}weight")
    ops = {}
    if kept_token_ids is not None:
        kept_token_ids = _ascending(kept_token_ids, vocab, "kept_token_ids")
        index = torch.tensor(kept_token_ids)
        for name in [emb_name, *head_names]:
            ops[name] = ("rows", index)
    intermediate = models.intermediate_size(model)
    keep = None if kept_channels is None else _channel_ops(model, shapes, kept_channels, intermediate, ops)
    return Slices(ops, vocab, intermediate, tied, kept_token_ids, keep)


def _channel_ops(model, shapes, kept_channels, intermediate: int, ops: dict) -> int:
    """Add the FFN ops to `ops`; the channel count every layer keeps."""
    mlps = models.mlps(model)
    unknown, absent = sorted(set(kept_channels) - set(mlps)), [n for n in mlps if n not in kept_channels]
    if unknown or absent:
        raise KeyError(f"kept_channels must name every MLP ({', '.join(list(mlps)[:2])}, ...); "
                       f"missing {absent[:3]}, unknown {unknown[:3]}")
    family = models.family_of(model.config)
    sizes = set()
    for name, mlp in mlps.items():
        index = torch.tensor(_ascending(kept_channels[name], intermediate, f"kept_channels[{name!r}]"))
        sizes.add(index.numel())
        p = models.prefix_of(model, mlp)
        for proj, idx in [*family.channel_rows(index, intermediate).items(), ("down_proj", index)]:
            if f"{p}{proj}.weight" not in shapes:
                raise ValueError(f"the checkpoint lacks {p}{proj}.weight")
            for param in ("weight", "bias") if proj != "down_proj" else ("weight",):
                if f"{p}{proj}.{param}" in shapes:
                    ops[f"{p}{proj}.{param}"] = ("rows", idx) if proj != "down_proj" else ("cols", idx)
    if len(sizes) != 1:
        raise ValueError(f"every layer must keep the same number of channels, got {sorted(sizes)}")
    return sizes.pop()


def out_shape(shape: tuple[int, ...], op) -> tuple[int, ...]:
    """The shape of a tensor after its op (None: unchanged)."""
    if op is None:
        return tuple(shape)
    kind, index = op
    return (index.numel(), *shape[1:]) if kind == "rows" else (shape[0], index.numel(), *shape[2:])


def slice_tensor(tensor: torch.Tensor, op) -> torch.Tensor:
    """The kept rows or columns of `tensor`, on its device: gather kernels for matrices, index_select for biases."""
    if op is None:
        return tensor
    kind, index = op
    index = index.to(tensor.device)
    if tensor.dim() == 1:
        return tensor.index_select(0, index)
    return (ck.gather_rows if kind == "rows" else ck.gather_cols)(tensor, index)


def renumber_special_ids(config, new_id: dict[int, int]) -> None:
    """Config token ids (models.SPECIAL_ID_ATTRS) to their new ids; a dropped one becomes None."""
    for attr in models.SPECIAL_ID_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int):
            setattr(config, attr, new_id.get(value))
        elif isinstance(value, (list, tuple)):
            setattr(config, attr, [new_id[v] for v in value if v in new_id] or None)


def edit_configs(slices: Slices, config, generation_config=None) -> None:
    """vocab_size, intermediate_size and the token ids of a config (and generation config) after the slices."""
    if slices.kept_token_ids is not None:
        config.vocab_size = slices.vocab_after
        for c in (config, generation_config):
            if c is not None:
                renumber_special_ids(c, slices.new_id)
    if slices.ffn_keep is not None:
        config.intermediate_size = slices.ffn_keep


def slice_model(model: nn.Module, kept_token_ids=None, kept_channels=None) -> Slices:
    """Cut `model` in place (weights, module sizes, padding index, config); returns the slices."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    slices = slices_of(model, shapes, kept_token_ids, kept_channels)
    for name, op in slices.ops.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        setattr(module, attr, nn.Parameter(slice_tensor(old.data, op), requires_grad=old.requires_grad))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings = module.weight.shape[0]
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if slices.kept_token_ids is not None and embedding.padding_idx is not None:
        embedding.padding_idx = slices.new_id.get(embedding.padding_idx)
    if head is not None and slices.tied:
        head.weight = embedding.weight
        head.out_features = embedding.num_embeddings
    if slices.ffn_keep is not None:
        for mlp in models.mlps(model).values():
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = slices.ffn_keep
    edit_configs(slices, model.config, getattr(model, "generation_config", None))
    return slices
