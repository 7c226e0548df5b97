"""The cut: a model cut in memory as a decision says (`apply`), or written as a checkpoint (`write`: staged,
renamed at the end; offloaded, tensor by tensor from the source files), with its tokenizer cut to match and
compact_report.json built once, after the cut."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .. import models, output, repair, slicing, tokenizer
from ..loading import Loaded
from ..options import CalibOptions, Method, Run
from ..report import build_report, write_card
from .decide import decide
from .records import Decision, Timings

def apply(loaded: Loaded, decision: Decision) -> tuple:
    """Cut the model in memory as `decision` says (re-fitted columns first): (the model, changed in place; the
    tokenizer cut to match, or None; the report, compact_report.json's contents, the cut timed as "slicing")."""
    timings = Timings(decision.timings)
    cut = _cut(loaded, decision, timings)
    return loaded.model, cut, build_report(loaded, decision, parameters_after=models.parameter_counts(loaded.model),
                                           tokenizer=_tokenizer_fate(loaded, decision.kept_token_ids),
                                           timings=timings)


def _cut(loaded: Loaded, decision: Decision, timings: Timings):
    """The model cut in place (re-fitted columns first), timed as "slicing"; the tokenizer cut to match. What can
    fail (the checks, the tokenizer's cut) comes before the model is changed."""
    if loaded.offloaded:
        raise ValueError("an offloaded model (--offload layerwise) is cut by `write`, tensor by tensor")
    with timings.phase("slicing"):
        _check_fits(loaded, decision)
        cut = cut_tokenizer(loaded, decision.kept_token_ids)
        if decision.refits:
            repair.apply_refits(loaded.model, decision.kept_channels, decision.refits)
        slicing.slice_model(loaded.model, decision.kept_token_ids, decision.kept_channels)
        return cut


def _check_fits(loaded: Loaded, decision: Decision) -> None:
    """ValueError (or IndexError, KeyError) unless `decision` was made for this model, not cut yet, and its ids,
    channels and re-fits index it."""
    if decision.model is not None:
        decision.model.check(loaded.model)
    shapes = {name: tuple(p.shape) for name, p in loaded.model.named_parameters()}
    slicing.slices_of(loaded.model, shapes, decision.kept_token_ids, decision.kept_channels)
    repair.check_refits(loaded.model, decision.kept_channels, decision.refits or {})


def write(loaded: Loaded, decision: Decision, out: Path, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Slice and save checkpoint, tokenizer, scores and report into a staged folder renamed to `out` at the end;
    returns the report. The model is cut in place (or, offloaded, written tensor by tensor from its files)."""
    timings = Timings(decision.timings)
    shape = models.fingerprint(loaded.model.config)  # of the model the scores belong to, before the cut
    with output.staged_dir(out, overwrite=overwrite) as tmp:
        if loaded.offloaded:
            with timings.phase("slicing"):
                _check_fits(loaded, decision)
                after = _write_offloaded(loaded, decision, tmp, progress)
            with timings.phase("save"):
                fate = save_tokenizer(loaded, decision.kept_token_ids, tmp)
        else:
            cut = _cut(loaded, decision, timings)
            after = models.parameter_counts(loaded.model)
            with timings.phase("save"):
                loaded.model.to(loaded.written_dtype).save_pretrained(tmp, safe_serialization=True)
                fate = save_tokenizer(loaded, decision.kept_token_ids, tmp, cut)
        if decision.scores is not None:
            with timings.phase("save"):
                output.save_scores(decision.scores, tmp / "compact_scores.safetensors", shape)
        result = build_report(loaded, decision, parameters_after=after, tokenizer=fate, timings=timings)
        output.write_json(tmp / "compact_report.json", result)
        write_card(tmp, result)
    return result


def _write_offloaded(loaded: Loaded, decision: Decision, folder: Path, progress: bool | None) -> dict:
    """The pruned shards written tensor by tensor from the source files into `folder`; the parameter counts after."""
    from ..layerwise_slicing import write_layerwise

    family, intermediate = models.family_of(loaded.model.config), models.intermediate_size(loaded.model)
    refits = {}
    for name, refit in (decision.refits or {}).items():
        refits[f"{name}.down_proj.weight"] = refit.down
        kept = torch.as_tensor(decision.kept_channels[name], dtype=torch.long)
        for projection, rows in repair.rows_replaced(family, refit, kept, intermediate).items():
            refits[f"{name}.{projection}.weight"] = rows
    summary = write_layerwise(loaded.source, folder, decision.kept_token_ids, decision.kept_channels,
                              device=loaded.device, progress=progress, replacements=refits,
                              dtype=loaded.written_dtype)
    return summary["parameters"]["after"]


def prune(loaded: Loaded, out: Path, method: Method, calib: CalibOptions = CalibOptions(), run: Run = Run(), *,
          overwrite: bool = False) -> dict:
    """Decide and write: prune `loaded` (changed in place) into `out`; returns the report."""
    return write(loaded, decide(loaded, method, calib, run), out, overwrite, run.progress)


def cut_tokenizer(loaded: Loaded, kept_ids: list[int] | None):
    """The tokenizer cut to `kept_ids` (the tokenizer itself when the vocabulary is not cut; None without one)."""
    if loaded.tokenizer is None or kept_ids is None:
        return loaded.tokenizer
    return tokenizer.prune_tokenizer(loaded.tokenizer, kept_ids)


def save_tokenizer(loaded: Loaded, kept_ids: list[int] | None, folder: Path, cut=None) -> str | None:
    """The tokenizer cut to `kept_ids` (`cut` when already made; None: the vocabulary is not cut, the tokenizer
    is saved as it is, whatever its type) into `folder`; what the report records. A warning when there is none."""
    if loaded.tokenizer is None:
        warnings.warn("the model has no tokenizer: the pruned checkpoint is written without one", stacklevel=2)
        return None
    (cut or cut_tokenizer(loaded, kept_ids)).save_pretrained(folder)
    return _tokenizer_fate(loaded, kept_ids)


def _tokenizer_fate(loaded: Loaded, kept_ids: list[int] | None) -> str | None:
    """What the report records of the tokenizer."""
    if loaded.tokenizer is None:
        return None
    return "unchanged (vocabulary not cut)" if kept_ids is None else "pruned to kept_token_ids"
