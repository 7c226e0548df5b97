"""Layerwise slicing (`--offload layerwise`): write the pruned checkpoint tensor by tensor from the source
safetensors, never loading the model.

`write_layerwise` reads one tensor at a time (`safetensors.safe_open`, reopened per tensor: the tensor is a view
of the file's mapping, released with it), slices it with the gather kernels and appends it to the output shard,
whose header is written first from the known output shapes; so peak memory is about two tensors (the source
one and its slice). Measured on the CPU (tests/test_layerwise_slicing.py): a 240 MiB fp32 model whose largest tensor is
16 MiB prunes with a peak RSS 31-37 MiB above the baseline (1.9-2.3 largest tensors), against 333-340 MiB
for load + slice + save_pretrained.

- embedding rows (and untied LM-head rows) `kept_token_ids`; a tied head exists only as the embedding;
- gate_proj / up_proj rows and down_proj columns `kept_channels[mlp]` (Phi-3's fused gate_up_proj: both halves);
- every other tensor byte for byte.

The output keeps the source's shard layout (same file names, a new `model.safetensors.index.json` when the
source had one) and dtypes; config.json gets vocab_size / intermediate_size and bos/eos/pad renumbered as
`compact.slicing` does; generation_config.json likewise. The result equals `compact.slicing.slice_model` on the
loaded model followed by `save_pretrained`, tensor for tensor.

The tokenizer and compact_report.json are not written here: the pipeline calls `write_layerwise` inside
`compact.output.staged_dir` and adds them before the atomic rename. The summary holds the sizes and parameter
counts before/after (from shapes).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from . import loading, models, output, slicing
from .models import prefix_of
from .progress import bar as progress_bar
from .shards import INDEX_NAME, SAFETENSORS_DTYPES, ShardWriter, nbytes, open_shards, read_tensor, tensor_info

# ------------------------------------------------------------------------------------------- writing

def _generation_config(path: Path, config):
    """The source's generation config or, as `from_pretrained` does when there is none or it cannot be read
    (then with a warning), one derived from config.json; None (with a warning) when none can be derived."""
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            return GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            warnings.warn(f"{path / 'generation_config.json'} cannot be read ({' '.join(str(e).split())}); the "
                          "pruned checkpoint gets one derived from config.json, as from_pretrained would", stacklevel=3)
    try:
        return GenerationConfig.from_model_config(config)
    except (ValueError, NotImplementedError) as e:
        warnings.warn(f"no generation config can be derived from {path / 'config.json'} ({e}); the pruned "
                      "checkpoint is written without generation_config.json", stacklevel=3)
        return None


def _configs(path: Path, config, slices: slicing.Slices, dtype_name: str | None):
    """config and generation config of the pruned checkpoint."""
    generation = _generation_config(path, config)
    slicing.edit_configs(slices, config, generation)
    if dtype_name is not None:
        config.dtype = dtype_name  # as save_pretrained records the weights' dtype
    return config, generation


def write_layerwise(model_dir, folder, kept_token_ids: list[int] | None,
                    kept_channels: dict[str, list[int]] | None, *, device="cpu",
                    progress: bool | None = None, replacements: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None) -> dict:
    """Write the pruned checkpoint (safetensors shards, index, config, generation config) into `folder`,
    which must exist; returns the summary. `kept_token_ids`: ascending old ids (None: vocabulary unchanged);
    `kept_channels`: {"model.layers.{i}.mlp": ascending channels}, the same count per layer (None: FFN
    unchanged). `replacements`: {tensor name: the sliced tensor to write instead} (re-fitted down_proj
    columns); `dtype`: floating tensors cast to it (None: as stored). No staging: the caller writes into a
    `compact.output.staged_dir`."""
    folder, path = Path(folder), loading.locate(str(model_dir))
    config, files, model = open_shards(path, "layerwise slicing", model_dir)  # model: names and roles only
    info = tensor_info(files)
    shapes = {name: shape for name, (_, shape) in info.items()}
    slices = slicing.slices_of(model, shapes, kept_token_ids, kept_channels)
    out_shapes = {name: slicing.out_shape(shape, slices.ops.get(name)) for name, shape in shapes.items()}
    out_info = {name: (_cast(kind, dtype), out_shapes[name]) for name, (kind, _) in info.items()}
    for name, tensor in (replacements or {}).items():
        if tuple(tensor.shape) != out_shapes[name]:
            raise ValueError(f"{name}: replacement of shape {tuple(tensor.shape)}, the slice is {out_shapes[name]}")
    weight_map, total_bytes = _write_shards(files, out_info, (slices.ops, replacements or {}), folder,
                                            torch.device(device), progress)
    before = models.parameter_counts(model, shapes, slices.tied)
    after = models.parameter_counts(model, out_shapes, slices.tied)
    if (path / INDEX_NAME).is_file():
        index = {"metadata": {"total_parameters": after["total"], "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        output.write_json(folder / INDEX_NAME, index)
    embedding = prefix_of(model, model.get_input_embeddings()) + "weight"
    dtype_name = str(SAFETENSORS_DTYPES[out_info[embedding][0]]).split(".")[1]
    config, generation = _configs(path, config, slices, dtype_name)
    config.save_pretrained(folder)
    if generation is not None:
        generation.save_pretrained(folder)
    return {
        "source": str(path), "shards": sorted(set(weight_map.values())), "tensors": len(info), "tied": slices.tied,
        "sizes": {"vocab_before": slices.vocab, "vocab_after": slices.vocab_after,
                  "intermediate_before": slices.intermediate, "intermediate_after": slices.intermediate_after,
                  "layers": len(models.mlps(model)), "hidden": shapes[embedding][1]},
        "parameters": {"before": before, "after": after},
        "bytes": {"before": sum(nbytes(d, s) for d, s in info.values()),
                  "after": sum(nbytes(d, s) for d, s in out_info.values())},
    }


def _cast(kind: str, dtype: torch.dtype | None) -> str:
    """The safetensors dtype a tensor stored as `kind` is written as: `dtype` for floating tensors."""
    if dtype is None or not SAFETENSORS_DTYPES[kind].is_floating_point:
        return kind
    return next(name for name, torch_dtype in SAFETENSORS_DTYPES.items() if torch_dtype == dtype)


def _write_shards(files: dict[str, Path], out_info: dict[str, tuple[str, tuple[int, ...]]], edits: tuple,
                  folder: Path, device: torch.device, progress: bool | None) -> tuple[dict[str, str], int]:
    """Each tensor read, sliced by its op (or replaced) and appended to the output shard of its source shard's
    name, one at a time; `edits`: (ops, replacements). Returns ({tensor name: shard name}, data bytes written)."""
    ops, replacements = edits
    by_shard: dict[Path, list[str]] = {}
    for name in sorted(out_info):
        by_shard.setdefault(files[name], []).append(name)
    weight_map, total_bytes = {}, 0
    with progress_bar(total=len(out_info), desc="slicing", unit="tensor", progress=progress) as bar:
        for shard in sorted(by_shard):
            names = by_shard[shard]
            writer = ShardWriter(folder / shard.name, [(n, *out_info[n]) for n in names], {"format": "pt"})
            try:
                for name in names:
                    if name in replacements:
                        tensor = replacements[name].to(SAFETENSORS_DTYPES[out_info[name][0]]).contiguous()
                    else:
                        tensor = slicing.slice_tensor(read_tensor(shard, name).to(device), ops.get(name)).cpu()
                        tensor = tensor.to(SAFETENSORS_DTYPES[out_info[name][0]])
                    writer.write(name, tensor)
                    del tensor
                    weight_map[name] = shard.name
                    bar.update()
            finally:
                writer.file.close()
            writer.close()
            total_bytes += writer.data_bytes
    return weight_map, total_bytes
