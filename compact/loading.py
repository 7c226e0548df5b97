"""Loading a model to prune: a local Hugging Face directory, a hub id already in the local cache, or a
llama2.c checkpoint file; plus its tokenizer when it has one. Never downloads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import llama2c, models

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object | None
    source: str
    report: dict | None = None  # compact_report.json of a checkpoint this package pruned


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """--dtype: auto means bfloat16 on a GPU, float32 on a CPU."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def resolve_device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return name


def _hub_snapshot(model_id: str) -> Path | None:
    """The local cache folder of a hub id, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def locate(source: str) -> Path:
    """The path behind MODEL: a directory with config.json, a llama2.c file, or a cached hub id."""
    path = Path(source)
    if path.is_file() and llama2c.is_llama2c_checkpoint(path):
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {source!r}: directory has no config.json")
        return path
    if path.exists():
        raise ValueError(f"model {source!r}: not a Hugging Face directory or a llama2.c checkpoint")
    snapshot = None if source.startswith((".", "/")) or source.count("/") > 1 else _hub_snapshot(source)
    if snapshot is None:
        raise FileNotFoundError(
            f"model {source!r} not found: not a local directory, a llama2.c checkpoint, or a hub id in the local cache")
    return snapshot


def load(source: str, *, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False) -> Loaded:
    """Load MODEL (see `locate`) in eval mode on `device`, with its tokenizer (None when it has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, device = locate(source), resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if path.is_file():
        return Loaded(llama2c.load_llama2c(path, dtype=torch_dtype).to(device), None, f"llama2.c checkpoint {path}")
    from transformers import AutoConfig

    models.family_of(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    report = path / "compact_report.json"
    return Loaded(model, tokenizer, str(path), json.loads(report.read_text()) if report.is_file() else None)

