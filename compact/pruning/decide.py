"""The decision, as the method's steps in straight-line code: calibration -> token counts -> the planner's split
-> vocabulary -> scores -> channels. `decide(..., upto=...)` returns where `compact score` and `compact plan`
need; nothing is written and the model is not changed."""
from __future__ import annotations

import json
import warnings
from contextlib import ExitStack
from dataclasses import replace

import torch

from .. import criteria, data, models, output, runs, selection, trials, vocab
from ..loading import Loaded
from ..options import DATA_FREE, CalibOptions, Method, Run, check_method, signature
from .calibration import calibrate, token_counts, with_generated
from .passes import check, ffn_pass
from .planning import split
from .records import STEPS, Decision, Job, Pass, Sizes, Timings

def decide(loaded: Loaded, method: Method = Method(), calib: CalibOptions = CalibOptions(), run: Run = Run(), *,
           upto: str = "selection", group: runs.Group | None = None) -> Decision:
    """Run the steps up to `upto` (one of STEPS), each only when the method needs it, each timed; nothing is
    written and the model is not changed. Under torchrun (`group`: compact.runs.group()) every rank runs this,
    sharing the calibration rows, and every rank gets the same decision."""
    job, timings = _job(loaded, method, calib, run, upto=upto, group=group or runs.Group()), Timings()
    with ExitStack() as generated:
        if calib.generate:
            with timings.phase("calibration text"):
                job = replace(job, calib=generated.enter_context(
                    with_generated(loaded, calib, seed=job.method.seed, group=job.group, progress=run.progress)))
        return _decide(job, calib, timings, asked_refit=None if method.refit == "auto" else method.refit)


def _decide(job: Job, calib: CalibOptions, timings: Timings, *, asked_refit: str | None) -> Decision:
    """`decide` once the calibration sources are there (`job.calib`; `calib`: as given, for the decision)."""
    loaded, run, upto, method = job.loaded, job.run, job.upto, job.method
    ffn_keep = _ffn_keep(job)
    calibration = held_out = counts = halves = None
    if method.target_params is not None or (job.data_scores and (upto == "scoring" or job.cuts(ffn_keep))):
        with timings.phase("calibration"):
            calibration, held_out = _calibrate(job)
    if method.target_params is not None or (method.vocab_order == "frequency" and method.vocab_keep is not None):
        with timings.phase("token counts"):
            counts, halves = _count(job)
    vocab_keep, plan, trial = job.vocabulary.keep_count(method.vocab_keep), None, None
    if method.target_params is not None:
        with timings.phase("planning"):
            plan, trial = split(job, counts=counts, halves=halves, calibration=calibration, held_out=held_out)
        vocab_keep, ffn_keep = plan.chosen.vocab_keep, plan.chosen.ffn_keep
    decided = Decision(method, calib, calibration, plan=plan, vocab_keep=vocab_keep, ffn_keep=ffn_keep,
                       model=models.Identity.of(loaded.model), timings=timings)
    if upto == "planning":
        return decided
    with timings.phase("vocabulary"):
        kept_ids = job.kept_ids(counts, vocab_keep)
    passed = Pass()
    if method.scores is None and (upto == "scoring" or job.cuts(ffn_keep)):
        with timings.phase("scoring"):
            passed = (_score(job, calibration, kept_ids, ffn_keep, timings) if trial is None
                      else replace(trial, check=check(job, calibration, kept_ids) if run.check else None))
    decided = replace(decided, kept_token_ids=kept_ids, scores=passed.scores, check=passed.check)
    if upto == "scoring":
        return decided
    with timings.phase("selection"):
        decided = _select(job, decided, passed)
    _warn_idle(job, asked_refit, decided)
    return decided


def _job(loaded: Loaded, method: Method, calib: CalibOptions, run: Run, *, upto: str, group: runs.Group) -> Job:
    """The job with the method's `vocab_order` and `refit` resolved, after the checks that need the model; its
    checkpoints' signature is the resolved method, the calibration and the batch size, for this model."""
    if upto not in STEPS:
        raise ValueError(f"upto must be one of {STEPS}, got {upto!r}")
    if method.vocab_order == "auto":
        method = replace(method, vocab_order="frequency" if calib.given else "id")
    job = Job(loaded, method, calib, run, upto, vocab.Vocabulary.of(loaded.model, loaded.tokenizer), group,
              runs.Checkpoints())
    _check_method(job)
    method = replace(method, refit=_resolve_refit(job))
    stamp = {**signature(method, calib, loaded.source, loaded.dtype), "batch_size": run.batch_size}
    checkpoints = runs.Checkpoints(run.checkpoint, run.checkpoint_every, run.resume, json.dumps(stamp))
    return replace(job, method=method, checkpoints=checkpoints)


def _check_method(job: Job) -> None:
    """What the method cannot do with these options (before any work): compact.options.check_method."""
    check_method(job.method, job.calib, prune=job.upto == "selection")


def _ffn_keep(job: Job) -> int | None:
    """Channels per layer the method asks for (all when it cuts none); None when planned, or for score/plan."""
    method = job.method
    if job.upto != "selection" or (method.ffn_keep is None and method.target_params is not None):
        return None
    if method.ffn_keep is None:
        return job.intermediate
    return selection.resolve_ffn_keep(method.ffn_keep, job.intermediate, method.ffn_multiple)


def _resolve_refit(job: Job) -> str:
    """--refit auto: sequential when calibration data drives an FFN cut (or the planner may cut), else none."""
    method = job.method
    if method.refit != "auto":
        return method.refit
    ffn_keep = _ffn_keep(job)
    may_cut = method.target_params is not None or job.cuts(ffn_keep)
    data_driven = job.data_scores and job.calib.given
    fits = job.upto in ("planning", "selection")
    return "sequential" if may_cut and data_driven and fits else "none"


def _warn_idle(job: Job, asked_refit: str | None, decided: Decision) -> None:
    """Options the run had nothing to apply to are said, not silently dropped."""
    if job.run.check and decided.check is None:
        warnings.warn("--check compares the calibration pass's fused scores with hooks; this prune ran none "
                      "(vocabulary only, --scores, or a data-free criterion): nothing was checked", stacklevel=3)
    if asked_refit not in (None, "none") and not decided.refits:
        warnings.warn(f"--refit {asked_refit} re-fits kept FFN channels; this prune cuts none: nothing was re-fitted",
                      stacklevel=3)


def _calibrate(job: Job) -> tuple[data.Calibration, data.Calibration | None]:
    """(the calibration rows, the rows held out for measured planning: up to a quarter as many more, or None)."""
    calib, progress = job.calib, job.run.progress
    if not trials.wanted(job):
        return calibrate(job.loaded, calib, progress), None
    rows = calibrate(job.loaded, replace(calib, samples=calib.samples + trials.held_rows(calib.samples)), progress)
    return trials.split_rows(rows, calib.samples)


def _count(job: Job) -> tuple[torch.Tensor, tuple | None]:
    """(token counts over the calibration file, over its alternate halves for the planner's cross-fit or None)."""
    counts = token_counts(job.loaded, job.calib, job.run.progress)
    if job.method.target_params is None or job.method.vocab_order != "frequency":
        return counts, None
    return counts, tuple(token_counts(job.loaded, job.calib, False, part) for part in (0, 1))


def _select(job: Job, decided: Decision, passed: Pass) -> Decision:
    """The decision completed: channels from the calibration pass, a scores file or a data-free criterion."""
    model, scores, kept = job.loaded.model, decided.scores, passed.kept_channels
    if job.method.scores:
        scores = output.load_scores(job.method.scores, {n: job.intermediate for n in models.mlps(model)},
                                    models.fingerprint(model.config))
    if job.cuts(decided.ffn_keep) and not kept:
        kept = selection.select_channels(scores, decided.ffn_keep)
    vocab = model.get_input_embeddings().num_embeddings
    ids = decided.kept_token_ids
    sizes = Sizes(vocab_before=vocab, vocab_after=vocab if ids is None else len(ids),
                  intermediate_before=job.intermediate, intermediate_after=decided.ffn_keep,
                  layers=len(models.mlps(model)), hidden=model.config.hidden_size)
    return replace(decided, scores=scores, kept_channels=kept or None, refits=passed.refits or None,
                   parameters_before=models.parameter_counts(model), sizes=sizes, dtype=job.loaded.dtype)


def _score(job: Job, calib: data.Calibration, kept_ids, ffn_keep: int | None, timings: Timings) -> Pass:
    """The scoring pass, with --check's result: for a prune the channels and their re-fit are chosen layer by
    layer in the engine's pass."""
    loaded, method, run = job.loaded, job.method, job.run
    if method.ffn_criterion in DATA_FREE:
        if loaded.offloaded:
            raise ValueError(f"--ffn-criterion {method.ffn_criterion} needs the weights: drop --offload layerwise")
        return Pass(scores=criteria.data_free_scores(loaded.model, method.ffn_criterion, method.seed))
    checked = check(job, calib, kept_ids) if run.check else None
    return replace(ffn_pass(job, calib, kept_ids, ffn_keep if job.cuts(ffn_keep) else None, timings), check=checked)
