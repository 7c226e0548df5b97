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

import warnings
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from . import loading, models, output, slicing
from .checkpoint import DTYPES, INDEX_NAME, ShardWriter, nbytes, open_checkpoint, read_tensor, tensor_info
from .models import prefix_of

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


def _configs(path: Path, config, the_plan: slicing.SlicePlan, dtype_name: str | None):
    """config and generation config of the pruned checkpoint."""
    generation = _generation_config(path, config)
    slicing.edit_configs(the_plan, config, generation)
    if dtype_name is not None:
        config.dtype = dtype_name  # as save_pretrained records the weights' dtype
    return config, generation


def write_pruned(model_dir, folder, kept_token_ids: list[int] | None, kept_channels: dict[str, list[int]] | None,
                 *, device="cpu", progress: bool | None = None) -> dict:
    """Write the pruned checkpoint (safetensors shards, index, config, generation config) into `folder`,
    which must exist; returns the summary. No staging: see `prune_streamed` for the atomic version."""

    folder = Path(folder)
    path = loading.locate(str(model_dir))
    config, files, model = open_checkpoint(path, "streamed pruning", model_dir)  # model: names and roles only
    info = tensor_info(files)
    the_plan = slicing.plan(model, {n: s for n, (_, s) in info.items()}, kept_token_ids, kept_channels)
    ops = the_plan.ops
    out_shapes = {name: slicing.out_shape(shape, ops.get(name)) for name, (_, shape) in info.items()}

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
                tensor = slicing.slice_tensor(read_tensor(shard, name).to(device), ops.get(name)).cpu()
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
    before = models.parameter_counts(model, {n: s for n, (_, s) in info.items()}, the_plan.tied)
    after = models.parameter_counts(model, out_shapes, the_plan.tied)
    if (path / INDEX_NAME).is_file():
        index = {"metadata": {"total_parameters": after["total"], "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        output.write_json(folder / INDEX_NAME, index)
    emb_dtype = prefix_of(model, model.get_input_embeddings()) + "weight"
    dtype_name = str(DTYPES[info[emb_dtype][0]]).split(".")[1]
    config, generation = _configs(path, config, the_plan, dtype_name)
    config.save_pretrained(folder)
    if generation is not None:
        generation.save_pretrained(folder)
    hidden = info[emb_dtype][1][1]
    return {
        "source": str(path), "shards": written, "tensors": len(info), "tied": the_plan.tied,
        "sizes": {"vocab_before": the_plan.vocab, "vocab_after": the_plan.vocab_after,
                  "intermediate_before": the_plan.intermediate, "intermediate_after": the_plan.intermediate_after,
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
