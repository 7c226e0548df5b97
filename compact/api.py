"""The Python API: prune a model you hold (a transformers model and its tokenizer), in memory.

    model, tokenizer = compact.load("SmolLM2-135M-Instruct.Q4_1.gguf")  # or a model folder, as `compact prune`
    decision = compact.decide(model, tokenizer, "calib.txt", compact.Method(vocab_keep=24576, ffn_keep="0.75"))
    model, tokenizer, report = compact.apply(model, tokenizer, decision)

`load` reads a model as the CLI does (a .gguf dequantized); `decide` computes what the prune keeps and why (a
frozen `compact.Decision`: look before you cut); `apply` cuts the model in place and returns it with the cut
tokenizer and the compact_report.json contents; `prune` is both. The CLI's `compact prune` runs the same code
and writes the same tensors."""
from __future__ import annotations

from pathlib import Path

from . import loading, pruning
from .loading import held
from .options import DTYPES, CalibOptions, Method, Run


def load(path: str | Path, *, dtype=None, device: str | None = None, trust_remote_code: bool = False) -> tuple:
    """(model, tokenizer or None) read as `compact prune` reads MODEL, ready for `decide`: a model folder, a hub id
    in the local cache, a .gguf file (dequantized to `dtype`: transformers' own gguf_file= load keeps a quantizer
    that `decide` refuses) or a llama2.c checkpoint. `dtype` (a torch dtype or its name; None is the CLI's
    --dtype auto) and `device` (None: cuda when present) as the CLI's --dtype and --device."""
    loaded = loading.load(str(path), dtype=_dtype_name(dtype), device=device, trust_remote_code=trust_remote_code)
    loaded.model.config._name_or_path = loaded.source  # the report names the file (a GGUF's folder otherwise)
    return loaded.model, loaded.tokenizer


def _dtype_name(dtype) -> str:
    """--dtype's name for `dtype` (None: auto); others are a one-line ValueError."""
    name = "auto" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be None, 'auto' or one of {', '.join(DTYPES)} (or its torch dtype), "
                         f"got {dtype!r}")
    return name


def decide(model, tokenizer=None, calibration: CalibOptions | str | Path | None = None, method: Method = Method(),
           run: Run = Run()) -> pruning.Decision:
    """What pruning `model` by `method` keeps, from `calibration` (a file or folder path, several: 16 x 2048
    tokens at most, or CalibOptions); the model is put in eval mode and not otherwise changed."""
    return pruning.decide(held(model, tokenizer), method, _calibration(calibration), run)


def apply(model, tokenizer, decision: pruning.Decision) -> tuple:
    """(the model cut in place, the cut tokenizer or None, the report) as `decision` says."""
    return pruning.apply(held(model, tokenizer), decision)


def prune(model, tokenizer=None, calibration: CalibOptions | str | Path | None = None, method: Method = Method(),
          run: Run = Run()) -> tuple:
    """decide, then apply: (the model cut in place, the cut tokenizer or None, the report)."""
    return apply(model, tokenizer, decide(model, tokenizer, calibration, method, run))


def _calibration(calibration) -> CalibOptions:
    if calibration is None or isinstance(calibration, CalibOptions):
        return calibration or CalibOptions()
    if isinstance(calibration, (str, Path, list, tuple)):
        return CalibOptions(calibration)
    raise TypeError(f"calibration must be a path (a file or folder), several, or compact.CalibOptions, got "
                    f"{type(calibration).__name__}")
