"""Slicing without loading the model: write the pruned checkpoint tensor by tensor from the source safetensors.

`prune_streamed` reads one tensor at a time (`safetensors.safe_open`, reopened per tensor: the tensor is a view
of the file's mapping, released with it), slices it with the gather kernels and appends it to the output shard,
whose header is written first from the known output shapes; so peak memory is about two tensors (the source
one and its slice). Measured on the CPU (tests/test_streamed.py): a 240 MiB fp32 model whose largest tensor is
16 MiB prunes with a peak RSS 31-37 MiB above the baseline (1.9-2.3 largest tensors), against 333-340 MiB
for load + slice + save_pretrained.

- embedding rows (and untied LM-head rows) `kept_token_ids`; a tied head exists only as the embedding;
- gate_proj / up_proj rows and down_proj columns `kept_channels[mlp]` (Phi-3's fused gate_up_proj: both halves);
- every other tensor byte for byte.

The output keeps the source's shard layout (same file names, a new `model.safetensors.index.json` when the
source had one) and dtypes; config.json gets vocab_size / intermediate_size and bos/eos/pad renumbered as
`compact.slicing` does; generation_config.json likewise. The result equals `slice_vocabulary` + `slice_ffn`
on the loaded model followed by `save_pretrained`, tensor for tensor.

The tokenizer and compact_report.json are not written here: `prune_streamed(..., finish=callback)` calls
`callback(staging_folder, summary)` before the atomic rename, or call `write_pruned` inside your own
`compact.output.staged_dir`. The summary holds the sizes and parameter counts before/after (from shapes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import compact_kernels as ck

from . import loading, models, output
from .checkpoint import (DTYPES, INDEX_NAME, ShardWriter, nbytes, numel, open_checkpoint, prefix_of, read_tensor, skeleton,
                         tensor_info)
from .slicing import renumber_special_ids

# ------------------------------------------------------------------------------------------- the plan

def _ascending(ids, limit: int, what: str) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError(f"{what} is empty")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(f"{what} must be ascending without repeats")
    if ids[0] < 0 or ids[-1] >= limit:
        raise IndexError(f"{what} holds {ids[0] if ids[0] < 0 else ids[-1]}, outside [0, {limit})")
    return ids


def _plan(model, info, kept_token_ids, kept_channels):
    """{tensor name: (op, index)} for every tensor that is sliced; op is "rows" or "cols"."""
    family = models.family_of(model.config)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_name = prefix_of(model, embedding) + "weight"
    if emb_name not in info:
        raise KeyError(f"the checkpoint lacks the embedding {emb_name}")
    vocab = info[emb_name][1][0]
    ops: dict[str, tuple[str, torch.Tensor]] = {}
    head_names = []
    if head is not None:
        head_prefix = prefix_of(model, head)
        head_names = [head_prefix + p for p, _ in head.named_parameters(recurse=False)
                      if head_prefix + p in info and head_prefix + p != emb_name]
    tied = not any(n.endswith("weight") for n in head_names)
    if tied and not getattr(model.config, "tie_word_embeddings", False) and head is not None:
        raise KeyError(f"the config says the LM head is not tied, but the checkpoint lacks {head_prefix}weight")
    if kept_token_ids is not None:
        index = torch.tensor(_ascending(kept_token_ids, vocab, "kept_token_ids"))
        ops[emb_name] = ("rows", index)
        for name in head_names:
            ops[name] = ("rows", index)
    sizes = set()
    mlps = models.mlps(model)
    intermediate = models.intermediate_size(model)
    if kept_channels is not None:
        unknown = sorted(set(kept_channels) - set(mlps))
        absent = [n for n in mlps if n not in kept_channels]
        if unknown or absent:
            raise KeyError(f"kept_channels must name every MLP ({', '.join(list(mlps)[:2])}, ...); "
                           f"missing {absent[:3]}, unknown {unknown[:3]}")
        for name, mlp in mlps.items():
            channels = _ascending(kept_channels[name], intermediate, f"kept_channels[{name!r}]")
            sizes.add(len(channels))
            index = torch.tensor(channels)
            p = prefix_of(model, mlp)
            if family.fused_gate_up:
                row_ops = {"gate_up_proj": torch.cat([index, index + intermediate])}
            else:
                row_ops = {"gate_proj": index, "up_proj": index}
            for proj, idx in row_ops.items():
                for param in ("weight", "bias"):
                    if f"{p}{proj}.{param}" in info:
                        ops[f"{p}{proj}.{param}"] = ("rows", idx)
                if f"{p}{proj}.weight" not in info:
                    raise KeyError(f"the checkpoint lacks {p}{proj}.weight")
            if f"{p}down_proj.weight" not in info:
                raise KeyError(f"the checkpoint lacks {p}down_proj.weight")
            ops[f"{p}down_proj.weight"] = ("cols", index)
        if len(sizes) != 1:
            raise ValueError(f"every layer must keep the same number of channels, got {sorted(sizes)}")
    return ops, vocab, intermediate, tied


def _out_shape(shape, op):
    if op is None:
        return shape
    kind, index = op
    return (index.numel(), *shape[1:]) if kind == "rows" else (shape[0], index.numel(), *shape[2:])


def _apply(tensor: torch.Tensor, op, device) -> torch.Tensor:
    if op is None:
        return tensor
    kind, index = op
    t = tensor.to(device)
    if t.dim() == 1:  # a bias: plain index_select, as compact.slicing does
        return t.index_select(0, index.to(device)).cpu()
    gathered = (ck.gather_rows if kind == "rows" else ck.gather_cols)(t, index.to(device))
    return gathered.cpu()


def parameter_counts(model, shapes: dict[str, tuple[int, ...]], tied: bool) -> dict[str, int]:
    """Parameters by part, like `compact.models.parameter_counts`, from tensor shapes (checkpoint names)."""
    params = {name for name, _ in model.named_parameters()}  # tied matrices once
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_prefix = prefix_of(model, embedding)
    head_prefix = prefix_of(model, head) if head is not None else None
    layer_prefixes = [(prefix_of(model, layer.self_attn), prefix_of(model, layer.mlp))
                      for layer in models.decoder_of(model).layers]
    counts = {"embedding": 0, "head": 0, "attention": 0, "ffn": 0, "total": 0}
    for name, shape in shapes.items():
        if name not in params:
            continue
        n = numel(shape)
        counts["total"] += n
        if name.startswith(emb_prefix):
            counts["embedding"] += n
        elif head_prefix is not None and name.startswith(head_prefix):
            counts["head"] += 0 if tied else n
        elif any(name.startswith(a) for a, _ in layer_prefixes):
            counts["attention"] += n
        elif any(name.startswith(m) for _, m in layer_prefixes):
            counts["ffn"] += n
    counts["other"] = counts["total"] - sum(counts[k] for k in ("embedding", "head", "attention", "ffn"))
    return counts


# ------------------------------------------------------------------------------------------- writing

def _configs(path: Path, config, kept_token_ids, keep: int | None, dtype_name: str | None):
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() \
            else GenerationConfig.from_model_config(config)
    except (OSError, ValueError, NotImplementedError):
        generation = None
    if kept_token_ids is not None:
        new_id = {old: new for new, old in enumerate(kept_token_ids)}
        config.vocab_size = len(kept_token_ids)
        for c in (config, generation):
            if c is not None:
                renumber_special_ids(c, new_id)
    if keep is not None:
        config.intermediate_size = keep
    if dtype_name is not None:
        config.dtype = dtype_name  # as save_pretrained records the weights' dtype
    return config, generation


def write_pruned(model_dir, folder, kept_token_ids: list[int] | None, kept_channels: dict[str, list[int]] | None,
                 *, device="cpu", progress: bool | None = None) -> dict:
    """Write the pruned checkpoint (safetensors shards, index, config, generation config) into `folder`,
    which must exist; returns the summary. No staging: see `prune_streamed` for the atomic version."""

    folder = Path(folder)
    path, config, files = open_checkpoint(loading.locate(str(model_dir)), "streamed pruning", model_dir)
    info = tensor_info(files)
    model = skeleton(config, torch.float32)  # names and module roles only
    ops, vocab, intermediate, tied = _plan(model, info, kept_token_ids, kept_channels)
    out_shapes = {name: _out_shape(shape, ops.get(name)) for name, (_, shape) in info.items()}
    keep = len(next(iter(kept_channels.values()))) if kept_channels is not None else None

    by_shard: dict[Path, list[str]] = {}
    for name in sorted(info):
        by_shard.setdefault(files[name], []).append(name)
    device = torch.device(device)
    weight_map, total_bytes, written = {}, 0, []
    bar = tqdm(total=len(info), desc="slicing", unit="tensor", disable=None if progress is None else not progress)
    for shard in sorted(by_shard):
        names = by_shard[shard]
        writer = ShardWriter(folder / shard.name, [(n, info[n][0], out_shapes[n]) for n in names], {"format": "pt"})
        try:
            for name in names:
                tensor = _apply(read_tensor(shard, name), ops.get(name), device)
                writer.write(name, tensor)
                del tensor
                weight_map[name] = shard.name
                bar.update()
        finally:
            writer.file.close()
        writer.close()
        total_bytes += writer.data_bytes
        written.append(shard.name)
    bar.close()
    before = parameter_counts(model, {n: s for n, (_, s) in info.items()}, tied)
    after = parameter_counts(model, out_shapes, tied)
    if (path / INDEX_NAME).is_file():
        index = {"metadata": {"total_parameters": after["total"], "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        output.write_json(folder / INDEX_NAME, index)
    emb_dtype = prefix_of(model, model.get_input_embeddings()) + "weight"
    dtype_name = str(DTYPES[info[emb_dtype][0]]).split(".")[1]
    config, generation = _configs(path, config, kept_token_ids, keep, dtype_name)
    config.save_pretrained(folder)
    if generation is not None:
        generation.save_pretrained(folder)
    hidden = info[emb_dtype][1][1]
    return {
        "source": str(path), "shards": written, "tensors": len(info), "tied": tied,
        "sizes": {"vocab_before": vocab, "vocab_after": len(kept_token_ids) if kept_token_ids is not None else vocab,
                  "intermediate_before": intermediate, "intermediate_after": keep if keep is not None else intermediate,
                  "layers": len(models.mlps(model)), "hidden": hidden},
        "parameters": {"before": before, "after": after},
        "bytes": {"before": sum(nbytes(d, s) for d, s in info.values()),
                  "after": sum(nbytes(info[n][0], s) for n, s in out_shapes.items())},
    }


def prune_streamed(model_dir, out_dir, kept_token_ids: list[int] | None, kept_channels: dict[str, list[int]] | None,
                   *, overwrite: bool = False, device="cpu", finish: Callable[[Path, dict], None] | None = None,
                   progress: bool | None = None) -> dict:
    """Write the pruned checkpoint of `model_dir` to `out_dir` atomically (a staging folder renamed at the end).

    `kept_token_ids`: ascending old ids (None: vocabulary unchanged); `kept_channels`: {"model.layers.{i}.mlp":
    ascending channels}, the same count per layer (None: FFN unchanged). `finish(staging_folder, summary)` runs
    before the rename (the lead's hook for the tokenizer and compact_report.json). Returns the summary.
    """
    path = loading.locate(str(model_dir))
    output.check_destination(Path(out_dir), overwrite=overwrite, protected=path)
    with output.staged_dir(Path(out_dir), overwrite=overwrite) as tmp:
        summary = write_pruned(path, tmp, kept_token_ids, kept_channels, device=device, progress=progress)
        if finish is not None:
            finish(tmp, summary)
    return summary
