"""The Python API: prune a model you hold (a transformers model and its tokenizer), in memory.

    decision = compact.decide(model, tokenizer, "calib.txt", compact.Method(vocab_keep=24576, ffn_keep="0.75"))
    model, tokenizer, report = compact.apply(model, tokenizer, decision)

`decide` computes what the prune keeps and why (a frozen `compact.Decision`: look before you cut); `apply` cuts
the model in place and returns it with the cut tokenizer and the compact_report.json contents; `prune` is both.
The CLI's `compact prune` runs the same code and writes the same tensors."""
from __future__ import annotations

from pathlib import Path

from . import pruning
from .loading import held
from .options import CalibOptions, Method, Run


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
