"""The pruning job as the method's steps: `decide` computes a frozen `Decision` (calibration -> token counts ->
the planner's split -> vocabulary -> scores -> channels) in straight-line code, `apply` cuts a model in memory
as the decision says, `write` saves the cut checkpoint (or, offloaded, writes it tensor by tensor). The CLI's
`score`, `plan` and `prune` and the Python API (`compact.decide`, `compact.prune`) run the same code,
`decide(..., upto=...)` returning where each needs."""
from __future__ import annotations

import itertools
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import (budget, criteria, data, engine, models, output, repair, runs, selection, slicing, tokenizer, trials,
               vocab)
from .loading import Loaded
from .options import DATA_FREE, CalibOptions, Method, Run, signature
from .report import build_report, model_card, original_ids
from .scoring import ScoringOptions


class CheckFailed(RuntimeError):
    """--check found the fused scores off the hook reference."""


CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
STEPS = ("calibration", "token counts", "planning", "vocabulary", "scoring", "selection")


class Timings(dict):
    """Seconds per phase, in the order the phases ran."""

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass(frozen=True)
class Job:
    """What a decision is computed from: the model, the method (`vocab_order` and `refit` resolved), the
    calibration options, the run options, the last step (one of STEPS), the model's vocabulary, the ranks and
    the checkpoints."""

    loaded: Loaded
    method: Method
    calib: CalibOptions
    run: Run
    upto: str
    vocabulary: vocab.Vocabulary  # of the model as loaded: built once, for the policy and the planner's curve
    group: runs.Group  # torchrun's ranks (the engine's passes share the calibration rows between them)
    checkpoints: runs.Checkpoints  # where and when the engine's passes save resume checkpoints

    @property
    def intermediate(self) -> int:
        return models.intermediate_size(self.loaded.model)

    @property
    def data_scores(self) -> bool:
        """Scores come from a pass over calibration data (not a file, not a data-free criterion)."""
        return self.method.scores is None and self.method.ffn_criterion not in DATA_FREE

    def cuts(self, ffn_keep: int | None) -> bool:
        """A prune that keeps `ffn_keep` channels per layer cuts the FFN."""
        return self.upto == "selection" and ffn_keep is not None and ffn_keep < self.intermediate


@dataclass(frozen=True)
class Decision:
    """What a prune keeps and why. `method`: as applied (`vocab_order` and `refit` resolved); `plan`: the
    planner's record for --target-params (the candidates weighed, the choice, measured trials); `vocab_keep`
    and `ffn_keep` (channels per layer): the sizes; `kept_token_ids` (None: vocabulary not cut) and
    `kept_channels` (None: FFN not cut): what stays; `refits`: re-fitted down_proj columns [D, K] per cut MLP;
    `scores`: per MLP by the criterion; `check`: --check's comparison with hooks; `timings`: seconds per step.
    Fields of steps past `upto` stay None."""

    method: Method
    calib: CalibOptions
    calibration: data.Calibration | None = None
    plan: dict | None = None
    vocab_keep: int | None = None
    ffn_keep: int | None = None
    kept_token_ids: list[int] | None = None
    scores: dict | None = None
    check: dict | None = None
    kept_channels: dict | None = None
    refits: dict | None = None
    parameters_before: dict | None = None
    timings: dict = field(default_factory=dict)


def decide(loaded: Loaded, method: Method = Method(), calib: CalibOptions = CalibOptions(), run: Run = Run(), *,
           upto: str = "selection", group: runs.Group | None = None) -> Decision:
    """Run the steps up to `upto` (one of STEPS), each only when the method needs it, each timed; nothing is
    written and the model is not changed. Under torchrun (`group`: compact.runs.group()) every rank runs this,
    sharing the calibration rows, and every rank gets the same decision."""
    asked_refit = None if method.refit == "auto" else method.refit
    job = _job(loaded, method, calib, run, upto=upto, group=group or runs.Group())
    method, timings = job.method, Timings()
    ffn_keep = _ffn_keep(job)
    calibration = held_out = counts = halves = None
    if method.target_params is not None or (job.data_scores and (upto == "scoring" or job.cuts(ffn_keep))):
        with timings.phase("calibration"):
            calibration, held_out = _calibrate(job)
    if method.target_params is not None or (method.vocab_order == "frequency" and method.vocab_keep is not None):
        with timings.phase("token counts"):
            counts, halves = _count(job)
    vocab_keep, plan, trial = method.vocab_keep, None, None
    if method.target_params is not None:
        with timings.phase("planning"):
            vocab_keep, ffn_keep, plan, trial = _split(job, (counts, halves), calibration, held_out)
    decided = Decision(method, calib, calibration, plan, vocab_keep, ffn_keep, timings=timings)
    if upto == "planning":
        return decided
    with timings.phase("vocabulary"):
        kept_ids = _kept_ids(job, counts, vocab_keep)
    passed = (None, None, None, None)  # scores, check, kept channels, re-fits
    if method.scores is None and (upto == "scoring" or job.cuts(ffn_keep)):
        with timings.phase("scoring"):
            passed = (_score(job, calibration, kept_ids, ffn_keep, timings) if trial is None
                      else (trial[0], _check(job, calibration, kept_ids) if run.check else None, *trial[1:]))
    decided = replace(decided, kept_token_ids=kept_ids, scores=passed[0], check=passed[1])
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
        method = replace(method, vocab_order="frequency" if calib.path else "id")
    job = Job(loaded, method, calib, run, upto, vocab.Vocabulary.of(loaded.model, loaded.tokenizer), group,
              runs.Checkpoints())
    _check_method(job)
    method = replace(method, refit=_resolve_refit(job))
    stamp = {**signature(method, calib, loaded.source, loaded.dtype), "batch_size": run.batch_size}
    checkpoints = runs.Checkpoints(run.checkpoint, run.checkpoint_every, run.resume, json.dumps(stamp))
    return replace(job, method=method, checkpoints=checkpoints)


def _check_method(job: Job) -> None:
    """What the method cannot do with these options (before any work)."""
    method = job.method
    fitted = method.refit not in ("auto", "none") or method.ffn_select == "obs"
    if fitted and not job.data_scores:
        raise ValueError("--refit and --ffn-select obs fit down_proj on the calibration pass: they need --calib and "
                         "a data-driven --ffn-criterion (not --scores or magnitude/random)")
    if job.upto != "selection":
        return
    if method.target_params is not None and (method.vocab_keep or method.ffn_keep):
        raise ValueError("give --target-params, or --vocab-keep/--ffn-keep, not both")
    if method.target_params is None and method.vocab_keep is None and method.ffn_keep is None:
        raise ValueError("nothing to prune: give --vocab-keep and/or --ffn-keep, or --target-params")


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
    data_driven = job.data_scores and job.calib.path is not None
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


def _split(job: Job, counts: tuple, calibration: data.Calibration, held_out) -> tuple:
    """(vocab_keep, ffn_keep, the planner's record, the chosen split's trial pass or None): every split priced;
    with held-out rows the best-priced ones pruned and measured, the best measured kept."""
    evidence = plain_scores(job, calibration)
    choice, candidates, plan = plan_split(job, counts, evidence)
    plan["refit"] = job.method.refit
    if held_out is None:
        return choice.vocab_keep, choice.ffn_keep, plan, None
    best, trial, measured = trials.measure(job, candidates, (calibration, held_out),
                                           (lambda n: _kept_ids(job, counts[0], n), ffn_pass))
    plan.update(measured, candidates=trials.chosen_rows(plan["candidates"], best))
    return best.vocab_keep, best.ffn_keep, plan, trial


def _kept_ids(job: Job, counts, vocab_keep: int | None) -> list[int] | None:
    method = job.method
    always = vocab.read_always_file(method.vocab_always) if method.vocab_always else ()
    return job.vocabulary.kept(vocab_keep, order=method.vocab_order, counts=counts, always=always)


def _select(job: Job, decided: Decision, passed: tuple) -> Decision:
    """The decision completed: channels from the calibration pass, a scores file or a data-free criterion."""
    model, scores, kept, refits = job.loaded.model, decided.scores, passed[2], passed[3]
    if job.method.scores:
        scores = output.load_scores(job.method.scores, {n: job.intermediate for n in models.mlps(model)},
                                    models.fingerprint(model.config))
    if job.cuts(decided.ffn_keep) and not kept:
        kept = selection.select_channels(scores, decided.ffn_keep)
    return replace(decided, scores=scores, kept_channels=kept or None, refits=refits or None,
                   parameters_before=models.parameter_counts(model))


def _score(job: Job, calib: data.Calibration, kept_ids, ffn_keep: int | None, timings: Timings) -> tuple:
    """(scores by the criterion, --check's result, kept channels, re-fits): for a prune the channels and their
    re-fit are chosen layer by layer in the engine's pass."""
    loaded, method, run = job.loaded, job.method, job.run
    if method.ffn_criterion in DATA_FREE:
        if loaded.offloaded:
            raise ValueError(f"--ffn-criterion {method.ffn_criterion} needs the weights: drop --offload layerwise")
        return criteria.data_free_scores(loaded.model, method.ffn_criterion, method.seed), None, None, None
    check = _check(job, calib, kept_ids) if run.check else None
    scores, kept, refits = ffn_pass(job, calib, kept_ids, ffn_keep if job.cuts(ffn_keep) else None, timings)
    return scores, check, kept, refits


def _check(job: Job, calib: data.Calibration, kept_ids) -> dict:
    """--check: the engine's fused scores against its hook path on the first batches."""
    def score(ids, mask, path):
        scoring = ScoringOptions(keep_token_ids=kept_ids, batch_size=job.run.batch_size, path=path, progress=False)
        return engine.run(layer_source(job.loaded), ids, mask, engine.EngineOptions(scoring)).scores

    return check_against_hooks(score, calib, batch_size=job.run.batch_size, batches=job.run.check_batches,
                               dtype=job.loaded.dtype)


def ffn_pass(job: Job, calib: data.Calibration, kept_ids, keep: int | None, timings: Timings | None = None) -> tuple:
    """The engine's pass: (scores by the criterion, kept channels, re-fitted columns); `keep` channels per layer
    chosen as it goes (None: scores only). The seconds the choice and the re-fit took inside the pass go to
    `timings` as "scoring: choice" and "scoring: re-fit" (parts of the scoring phase)."""
    method = job.method

    def choose(stats: engine.LayerStats) -> engine.Choice:
        scores = criteria.layer_scores(stats, method.ffn_criterion)
        if keep is None:
            return engine.Choice(scores=scores)
        if method.ffn_select == "obs":
            gram, cross = _fit_statistics(stats)
            kept = repair.eliminate(stats.mlp.down_proj.weight.detach(), cross, gram, keep)
        else:
            kept = selection.top_channels(scores, keep, stats.name)
        return engine.Choice(tuple(kept), scores)

    scoring = ScoringOptions(keep_token_ids=kept_ids, batch_size=job.run.batch_size, progress=job.run.progress)
    options = engine.EngineOptions(scoring, plain=method.ffn_criterion != "common-act2", refit=method.refit,
                                   gram=method.ffn_select == "obs", host_memory=job.run.host_memory)
    checkpoints = job.checkpoints.named(f"ffn-{runs.digest([kept_ids, keep])}")
    outcome = engine.run(layer_source(job.loaded), calib.input_ids, calib.attention_mask, options, choose,
                         group=job.group, checkpoints=checkpoints)
    if timings is not None and keep is not None:
        timings["scoring: choice"] = round(outcome.choice_seconds, 4)
        timings["scoring: re-fit"] = round(outcome.refit_seconds, 4)
    return {name: c.scores for name, c in outcome.choices.items()}, outcome.kept, outcome.refits


def plain_scores(job: Job, calib: data.Calibration) -> tuple[dict, dict | None]:
    """(act^2 over all calibration tokens, with a re-fit the share of each layer's output error it leaves at
    each K or None): the FFN evidence of the budget planner, one layer's Gram at a time."""
    method = job.method
    priced = method.refit != "none"

    def price(stats: engine.LayerStats) -> engine.Choice:
        return engine.Choice(left=budget.repair_left(stats.mlp.down_proj.weight.detach(), stats.scores, stats.gram,
                                                     method.ffn_multiple))

    options = engine.EngineOptions(ScoringOptions(batch_size=job.run.batch_size, progress=job.run.progress),
                                   gram=priced, host_memory=job.run.host_memory)
    outcome = engine.run(layer_source(job.loaded), calib.input_ids, calib.attention_mask, options,
                         price if priced else None, group=job.group, checkpoints=job.checkpoints.named("plan"))
    return outcome.scores, {name: c.left for name, c in outcome.choices.items()} if priced else None


def plan_split(job: Job, counts: tuple, evidence: tuple) -> tuple:
    """(the cheapest candidate, every candidate, the planner's record) for --target-params, by the rule in
    compact.budget, pricing each vocabulary cut by the rows and tokens the vocabulary policy really keeps,
    and each FFN cut by its act^2 share (times the error share the re-fit leaves, with a re-fit). `counts`:
    (all, halves or None); `evidence`: plain_scores' pair."""
    method = job.method
    curve = _vocab_curve(job, counts)
    plain, left = evidence
    choice, candidates = budget.choose_split(budget.accounting(job.loaded.model), method.target_params, curve,
                                     budget.score_loss_curve(plain, left), method.ffn_multiple)
    return choice, candidates, {"target": method.target_params, "rule": budget.RULE,
                                "candidates": budget.summary(choice, candidates)}


def _vocab_curve(job: Job, counts: tuple) -> budget.VocabCurve:
    """Rows kept and calibration tokens dropped at every N; in frequency order also the cross-fitted loss: the
    keep order from one half of the text, the loss on the other, both ways, averaged."""
    vocabulary, method, (counts, halves) = job.vocabulary, job.method, counts
    always = vocab.read_always_file(method.vocab_always) if method.vocab_always else ()
    base = vocabulary.base_rows
    curve = budget.vocab_curve(counts, *vocabulary.keep_curve(method.vocab_order, counts, always=always), base)
    if halves is not None:
        losses = [budget.vocab_curve(measure, *vocabulary.keep_curve("frequency", order, always=always),
                                     base).token_loss for order, measure in (halves, halves[::-1])]
        curve.heldout_loss = (losses[0] + losses[1]) / 2
    return curve


def calibrate(loaded: Loaded, opts: CalibOptions, progress: bool | None = None) -> data.Calibration:
    """Calibration sequences for the model, seq_len capped at its context."""
    if opts.path is None:
        raise ValueError("this needs calibration data: pass --calib PATH")
    model = loaded.model
    context = getattr(model.config, "max_position_embeddings", None) or opts.seq_len
    eos = getattr(loaded.tokenizer, "eos_token_id", None) if loaded.tokenizer else model.config.eos_token_id
    # Token-id data for a pruned model holds the original model's ids (before every prune): map them through
    # the composition of the cuts.
    report = loaded.report if Path(opts.path).suffix in data.ID_SUFFIXES else None
    if loaded.report_damaged and Path(opts.path).suffix in data.ID_SUFFIXES:
        raise ValueError(loaded.report_damaged)
    remap, original_vocab = original_ids(report) if report else (None, None)
    calib = data.load_calibration(
        replace(opts, seq_len=min(opts.seq_len, context)), tokenizer=loaded.tokenizer,
        vocab_size=original_vocab if report else model.get_input_embeddings().num_embeddings,
        eos_id=eos if isinstance(eos, int) and not remap else None, progress=progress)
    if remap:
        calib.input_ids = renumber(calib.input_ids, calib.attention_mask, remap, original_vocab, opts.path)
    return calib

def renumber(input_ids: torch.Tensor, attention_mask, kept_token_ids: list[int], old_vocab: int, path) -> torch.Tensor:
    """Old token ids -> new ids of a vocabulary-pruned model; an error names a dropped id the data holds."""
    table = torch.full((old_vocab,), -1, dtype=torch.long)
    table[torch.tensor(kept_token_ids)] = torch.arange(len(kept_token_ids))
    new = table[input_ids]
    valid = torch.ones_like(new, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    dropped = (new < 0) & valid
    if dropped.any():
        raise ValueError(f"{path} holds token id {int(input_ids[dropped][0])}, which this pruned model's "
                         f"vocabulary dropped ({int(dropped.sum())} such positions)")
    return new.clamp_min(0)

def token_counts(loaded: Loaded, calib_opts: CalibOptions, progress: bool | None = None, part=None) -> torch.Tensor:
    """Token frequencies over the whole calibration file, streamed; `part` 0 or 1: over every other line of
    text (block of 4096 ids), the two halves the planner cross-fits frequency order on."""
    if calib_opts.path is None:
        raise ValueError("--vocab-order frequency and --target-params need calibration data: pass --calib PATH")
    rows = loaded.model.get_input_embeddings().num_embeddings
    chunks = data.stream(calib_opts.path, bin_dtype=calib_opts.bin_dtype)
    if part is not None:
        chunks = itertools.islice(_pieces(chunks), part, None, 2)
    return vocab.count_tokens(loaded.tokenizer, chunks, num_embeddings=rows, progress=progress)


def _pieces(chunks):
    """Lines of text chunks, 4096-id blocks of id chunks."""
    for chunk in chunks:
        if isinstance(chunk, str):
            yield from chunk.splitlines(keepends=True)
        else:
            yield from (chunk[i:i + 4096] for i in range(0, len(chunk), 4096))

def layer_source(loaded: Loaded):
    """Where the engine finds the layers: the model in memory, or its files one layer at a time."""
    if not loaded.offloaded:
        return engine.Resident(loaded.model)
    from .layerwise import Placement, Shards

    return Shards(loaded.source, Placement(device=loaded.device, dtype=loaded.dtype))

def check_against_hooks(score, calib: data.Calibration, *, batch_size: int, batches: int, dtype) -> dict:
    """`score(ids, mask, path)` on the first batches, the fused scoring path vs the plain hook path: the largest difference
    relative to each layer's maximum."""
    n = min(calib.input_ids.shape[0], batch_size * batches)
    mask = None if calib.attention_mask is None else calib.attention_mask[:n]
    runs_ = {path: score(calib.input_ids[:n], mask, path) for path in ("fused", "hooks")}
    worst, where = 0.0, None
    for name, ref in runs_["hooks"].items():
        scale = ref.abs().max().clamp_min(1e-30)
        diff = float(((runs_["fused"][name] - ref).abs() / scale).max())
        if diff >= worst:
            worst, where = diff, name
    rtol = CHECK_RTOL[dtype]
    result = {"sequences": n, "max_rel_diff": worst, "worst_layer": where, "rtol": rtol, "ok": worst <= rtol}
    if not result["ok"]:
        raise CheckFailed(f"--check failed: fused scores differ from the hook reference by {worst:.3g} "
                          f"(relative to the layer maximum) in {where}, above {rtol:g}")
    return result

def _fit_statistics(stats: engine.LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gram, cross term) the re-fit solves with: the pruned stream's (sequential) or the unpruned one's."""
    if stats.cross is not None:
        return stats.shifted_gram, stats.cross
    return stats.gram, stats.mlp.down_proj.weight.detach().double() @ stats.gram


def apply(loaded: Loaded, decision: Decision, timings: Timings | None = None) -> tuple:
    """Cut the model in memory as `decision` says (re-fitted columns first): (the model, changed in place; the
    tokenizer cut to match, or None; the report, compact_report.json's contents). The cut is timed as "slicing"
    in `timings` (a copy of the decision's when None), which the report holds."""
    if loaded.offloaded:
        raise ValueError("an offloaded model (--offload layerwise) is cut by `write`, tensor by tensor")
    timings = Timings(decision.timings) if timings is None else timings
    report = build_report(loaded, decision, timings)  # before the cut: the model's shape and ids as decided
    with timings.phase("slicing"):
        if decision.refits:
            repair.apply_refits(loaded.model, decision.kept_channels, decision.refits)
        slicing.slice_model(loaded.model, decision.kept_token_ids, decision.kept_channels)
        cut = cut_tokenizer(loaded, decision.kept_token_ids)
    report["parameters"]["after"] = models.parameter_counts(loaded.model)
    report["tokenizer"] = _tokenizer_fate(loaded, decision.kept_token_ids)
    return loaded.model, cut, report


def write(loaded: Loaded, decision: Decision, out: Path, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Slice and save checkpoint, tokenizer, scores and report into a staged folder renamed to `out` at the end;
    returns the report. The model is cut in place (or, offloaded, written tensor by tensor from its files)."""
    timings = Timings(decision.timings)
    shape = models.fingerprint(loaded.model.config)  # of the model the scores belong to, before the cut
    with output.staged_dir(out, overwrite=overwrite) as tmp:
        if loaded.offloaded:
            result = build_report(loaded, decision, timings)
            with timings.phase("slicing"):
                result["parameters"]["after"] = _write_offloaded(loaded, decision, tmp, progress)
            with timings.phase("save"):
                result["tokenizer"] = save_tokenizer(loaded, decision.kept_token_ids, tmp)
        else:
            model, cut, result = apply(loaded, decision, timings)
            with timings.phase("save"):
                model.to(loaded.written_dtype).save_pretrained(tmp, safe_serialization=True)
                save_tokenizer(loaded, decision.kept_token_ids, tmp, cut)
        if decision.scores is not None:
            with timings.phase("save"):
                output.save_scores(decision.scores, tmp / "compact_scores.safetensors", shape)
        output.write_json(tmp / "compact_report.json", result)
        (tmp / "README.md").write_text(model_card(result), encoding="utf-8")
    return result


def _write_offloaded(loaded: Loaded, decision: Decision, folder: Path, progress: bool | None) -> dict:
    """The pruned shards written tensor by tensor from the source files into `folder`; the parameter counts after."""
    from .layerwise_slicing import write_layerwise

    refits = {f"{name}.down_proj.weight": columns for name, columns in (decision.refits or {}).items()}
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
