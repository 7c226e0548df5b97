"""Shards: the safetensors files of a Hugging Face model directory, read tensor by tensor, the model's
meta-device skeleton, and a shard writer that writes tensors out one at a time. Used by `--offload layerwise`:
layerwise scoring (`compact.layerwise`) and layerwise slicing (`compact.layerwise_slicing`); depends on no other
stage."""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch
from torch import nn

from . import models

# safetensors dtype codes -> torch dtypes (those the shards of these families can hold)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


# ------------------------------------------------------------------------------------------- safetensors I/O

def tensor_info(files: dict[str, Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} from the shard headers, without reading any data."""
    from safetensors import safe_open

    info = {}
    for shard in sorted(set(files.values())):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if files.get(name) == shard:
                    s = f.get_slice(name)
                    info[name] = (s.get_dtype(), tuple(s.get_shape()))
    return info


def read_tensor(shard: Path, name: str) -> torch.Tensor:
    """One tensor from its own `safe_open`: with safetensors >= 0.8 a view of the file's mapping, which is
    unmapped when the tensor is freed (so touched pages never outlive the tensor)."""
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        return f.get_tensor(name)


class ShardWriter:
    """A safetensors file written one tensor at a time: the header (all names, dtypes, shapes) goes first."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset, self.expected = 0, []
        for name, dtype, shape in entries:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} is not supported by the shard writer")
            size = nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.expected.append((name, SAFETENSORS_DTYPES[dtype], tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
        self.data_bytes = offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self.expected[self.next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want_name, dtype, shape):
            raise RuntimeError(f"shard writer: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                               f"expected {want_name} {dtype} {shape}")
        if tensor.numel():
            self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.expected):
            raise RuntimeError(f"shard writer: {len(self.expected) - self.next} tensors were never written")


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def open_shards(path: Path, what: str, model_dir=None, dtype: torch.dtype = torch.float32):
    """(config, {tensor name: shard}, meta skeleton in `dtype`) of a supported, unquantized safetensors model
    directory `path` (as `compact.loading.locate` found it; `model_dir` is how the user named it, for messages),
    whose tensors are exactly the skeleton's."""
    from transformers import AutoConfig

    model_dir = path if model_dir is None else model_dir
    if path.is_file():
        raise ValueError(f"{model_dir}: {what} needs a Hugging Face safetensors directory, "
                         "not a llama2.c checkpoint (it is small: load it whole)")
    config = AutoConfig.from_pretrained(path)
    models.check_prunable(config, model_dir)
    files = shard_files(path)
    model = skeleton(config, dtype)
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = [n for n in set(files) - expected if not any(p.search(n) for p in ignored)]
    check_tensor_names(model_dir, expected - set(files), unexpected)
    return config, files, model


def check_tensor_names(source, missing, unexpected, mis_shaped=()) -> None:
    """Missing, unexpected or mis-shaped tensors are an error, naming them: nothing is invented or dropped."""
    problems = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for names, what in ((sorted(missing), "missing"), (sorted(unexpected), "unexpected"),
                                    (sorted(mis_shaped), "mis-shaped")) if names]
    if problems:
        raise ValueError(f"model {str(source)!r}: its weights do not match its config: {'; '.join(problems)} tensors")


def _shard_names(shard: Path) -> list[str]:
    """The tensor names in one safetensors file (its header only); ValueError when it is damaged."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(shard), framework="pt") as f:
            return list(f.keys())
    except SafetensorError as e:
        raise ValueError(f"{shard} is damaged or not a safetensors file ({e})") from None


def shard_files(model_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file holding it}, from the index json or the single model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in set(files.values()):
            if not shard.is_file():
                raise FileNotFoundError(f"{index} names shard {shard.name}, which is missing")
            _shard_names(shard)
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return {name: single for name in _shard_names(single)}
    raise FileNotFoundError(
        f"{model_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}: --offload layerwise needs safetensors "
        "(re-save a .bin checkpoint with save_pretrained(safe_serialization=True))")


def read_tensors(files: dict[str, Path], names):
    """Yield (name, tensor) for the named tensors, each shard opened once. The tensors are CPU views of the
    file's mapping (safetensors >= 0.8 does not copy): use each one before asking for the next."""
    from safetensors import safe_open

    by_shard: dict[Path, list[str]] = {}
    for name in names:
        by_shard.setdefault(files[name], []).append(name)
    for shard, shard_names in by_shard.items():
        with safe_open(str(shard), framework="pt") as f:
            for name in shard_names:
                yield name, f.get_tensor(name)


def skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The whole model on the meta device: module structure and shapes, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def storage_dtype(model_dir: Path) -> torch.dtype | None:
    """The floating dtype most of a model directory's shards are stored in (None: no safetensors)."""
    try:
        files = shard_files(model_dir)
    except (FileNotFoundError, ValueError):
        return None
    kinds = [SAFETENSORS_DTYPES[kind] for kind, _ in tensor_info(files).values()]
    kinds = [dtype for dtype in kinds if dtype.is_floating_point]
    return max(set(kinds), key=kinds.count) if kinds else None


def nbytes(dtype: str, shape) -> int:
    return torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size() * math.prod(shape)
