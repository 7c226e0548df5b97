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
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

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
class Check:
    """--check's comparison of the fused scores with the hook path: over `sequences` rows, the largest
    difference relative to a layer's maximum, where, the tolerance, and whether it held."""

    sequences: int
    max_rel_diff: float
    worst_layer: str | None
    rtol: float
    ok: bool


@dataclass(frozen=True)
class Pass:
    """What a calibration pass gave: scores per MLP by the criterion, --check's result, and (when it chose them
    as it went) the kept channels and their re-fitted down_proj columns per cut MLP; None where it gave none."""

    scores: Mapping[str, torch.Tensor] | None = None
    check: Check | None = None
    kept_channels: Mapping[str, list[int]] | None = None
    refits: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Sizes:
    """The vocabulary rows and FFN channels per layer before and after the cut, the layers and the hidden size
    (compact_report.json's "sizes")."""

    vocab_before: int
    vocab_after: int
    intermediate_before: int
    intermediate_after: int
    layers: int
    hidden: int


@dataclass(frozen=True)
class Decision:
    """What a prune keeps and why. `method`: as applied (`vocab_order` and `refit` resolved); `plan`: the
    planner's record for --target-params (the candidates weighed, the choice, measured trials); `vocab_keep`
    and `ffn_keep` (channels per layer): the sizes; `kept_token_ids` (None: vocabulary not cut) and
    `kept_channels` (None: FFN not cut): what stays; `refits`: re-fitted down_proj columns [D, K] per cut MLP;
    `scores`: per MLP by the criterion; `check`: --check's comparison with hooks; `parameters_before`, `sizes`
    and `dtype` (the compute dtype): of the model as decided on; `timings`: seconds per step. Fields of steps
    past `upto` stay None. Read-only throughout: mappings are read-only views, id lists tuples."""

    method: Method
    calib: CalibOptions
    calibration: data.Calibration | None = None
    plan: budget.Plan | None = None
    vocab_keep: int | None = None
    ffn_keep: int | None = None
    kept_token_ids: tuple[int, ...] | None = None
    scores: Mapping[str, torch.Tensor] | None = None
    check: Check | None = None
    kept_channels: Mapping[str, tuple[int, ...]] | None = None
    refits: Mapping[str, torch.Tensor] | None = None
    parameters_before: Mapping[str, int] | None = None
    sizes: Sizes | None = None
    dtype: torch.dtype | None = None
    timings: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        """Maps copied into read-only views, id lists into tuples; `timings` a view of decide's clock, which adds
        its last phases after the decision is made."""
        frozen = {name: _read_only(getattr(self, name)) for name in ("scores", "refits", "parameters_before")}
        if self.kept_channels is not None:
            frozen["kept_channels"] = _read_only({name: tuple(kept) for name, kept in self.kept_channels.items()})
        if self.kept_token_ids is not None:
            frozen["kept_token_ids"] = tuple(self.kept_token_ids)
        if not isinstance(self.timings, MappingProxyType):
            frozen["timings"] = MappingProxyType(self.timings)
        for name, value in frozen.items():
            object.__setattr__(self, name, value)


def _read_only(mapping: Mapping | None) -> Mapping | None:
    """A read-only copy of `mapping` (None stays None)."""
    return None if mapping is None else MappingProxyType(dict(mapping))


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
            plan, trial = _split(job, counts=counts, halves=halves, calibration=calibration, held_out=held_out)
        vocab_keep, ffn_keep = plan.chosen.vocab_keep, plan.chosen.ffn_keep
    decided = Decision(method, calib, calibration, plan=plan, vocab_keep=vocab_keep, ffn_keep=ffn_keep,
                       timings=timings)
    if upto == "planning":
        return decided
    with timings.phase("vocabulary"):
        kept_ids = _kept_ids(job, counts, vocab_keep)
    passed = Pass()
    if method.scores is None and (upto == "scoring" or job.cuts(ffn_keep)):
        with timings.phase("scoring"):
            passed = (_score(job, calibration, kept_ids, ffn_keep, timings) if trial is None
                      else replace(trial, check=_check(job, calibration, kept_ids) if run.check else None))
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


def _split(job: Job, *, counts: torch.Tensor, halves: tuple[torch.Tensor, torch.Tensor] | None,
           calibration: data.Calibration, held_out: data.Calibration | None) -> tuple[budget.Plan, Pass | None]:
    """(the planner's record, the chosen split's trial pass or None): every split priced; with held-out rows the
    best-priced ones pruned and measured, the best measured chosen."""
    method = job.method
    scores, left = plain_scores(job, calibration)
    choice, candidates = plan_split(job, counts=counts, halves=halves, scores=scores, left=left)
    measured, chosen, trial = (None, choice, None) if held_out is None else _measure(
        job, candidates, counts=counts, calibration=calibration, held_out=held_out)
    plan = budget.Plan(target=method.target_params, rule=budget.RULE, refit=method.refit,
                       candidates=budget.summary(candidates, choice=choice, chosen=chosen), measured=measured,
                       held_out=None if held_out is None else held_out.source)
    return plan, trial


def _measure(job: Job, candidates: list[budget.Candidate], *, counts: torch.Tensor, calibration: data.Calibration,
             held_out: data.Calibration) -> tuple[tuple[trials.Trial, ...], budget.Candidate, Pass]:
    """The best-priced `candidates` (compact.trials), each pruned with the prune's own pass and read on the
    held-out rows: (the trials, the best measured candidate, its pass)."""
    shortlisted, measured, passes = trials.shortlist(candidates, job.method.plan_trials), [], []
    for candidate in shortlisted:
        kept_ids = _kept_ids(job, counts, candidate.vocab_keep)
        keep = candidate.ffn_keep if candidate.ffn_keep < job.intermediate else None
        passes.append(ffn_pass(job, calibration, kept_ids, keep))
        bits = trials.held_out_bits_per_byte(job.loaded, held_out, kept_ids=kept_ids,
                                             kept_channels=passes[-1].kept_channels, refits=passes[-1].refits)
        measured.append(trials.Trial(vocab_keep=candidate.vocab_keep, ffn_keep=candidate.ffn_keep,
                                     cost=candidate.cost, bits_per_byte=bits))
    measured = trials.choose(measured)
    best = next(i for i, trial in enumerate(measured) if trial.chosen)
    return measured, shortlisted[best], passes[best]


def _kept_ids(job: Job, counts, vocab_keep: int | None) -> list[int] | None:
    method = job.method
    always = vocab.read_always_file(method.vocab_always) if method.vocab_always else ()
    return job.vocabulary.kept(vocab_keep, order=method.vocab_order, counts=counts, always=always)


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
    check = _check(job, calib, kept_ids) if run.check else None
    return replace(ffn_pass(job, calib, kept_ids, ffn_keep if job.cuts(ffn_keep) else None, timings), check=check)


def _check(job: Job, calib: data.Calibration, kept_ids) -> Check:
    """--check: the engine's fused scores against its hook path on the first batches."""
    def score(ids, mask, path):
        scoring = ScoringOptions(keep_token_ids=kept_ids, batch_size=job.run.batch_size, path=path, progress=False)
        return engine.run(layer_source(job.loaded), ids, mask, engine.EngineOptions(scoring)).scores

    return check_against_hooks(score, calib, batch_size=job.run.batch_size, batches=job.run.check_batches,
                               dtype=job.loaded.dtype)


def ffn_pass(job: Job, calib: data.Calibration, kept_ids, keep: int | None, timings: Timings | None = None) -> Pass:
    """The engine's pass: scores by the criterion, kept channels, re-fitted columns; `keep` channels per layer
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
    return Pass(scores={name: c.scores for name, c in outcome.choices.items()}, kept_channels=outcome.kept,
                refits=outcome.refits)


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


def plan_split(job: Job, *, counts: torch.Tensor, halves: tuple[torch.Tensor, torch.Tensor] | None,
               scores: dict, left: dict | None) -> tuple[budget.Candidate, list[budget.Candidate]]:
    """(the cheapest candidate, every candidate) for --target-params, by the rule in compact.budget, pricing
    each vocabulary cut by the rows and tokens the vocabulary policy really keeps, and each FFN cut by its act^2
    share (times the error share the re-fit leaves, with a re-fit). `counts`, `halves`: token counts over the
    calibration file and its two halves (None: not cross-fitted); `scores`, `left`: plain_scores' evidence."""
    method = job.method
    curve = _vocab_curve(job, counts=counts, halves=halves)
    return budget.choose_split(budget.accounting(job.loaded.model), method.target_params, curve,
                               budget.score_loss_curve(scores, left), method.ffn_multiple)


def _vocab_curve(job: Job, *, counts: torch.Tensor,
                 halves: tuple[torch.Tensor, torch.Tensor] | None) -> budget.VocabCurve:
    """Rows kept and calibration tokens dropped at every N; with `halves` (frequency order) also the
    cross-fitted loss: the keep order from one half of the text, the loss on the other, both ways, averaged."""
    vocabulary, method = job.vocabulary, job.method
    always = vocab.read_always_file(method.vocab_always) if method.vocab_always else ()
    base = vocabulary.base_rows
    curve = budget.vocab_curve(counts, *vocabulary.keep_curve(method.vocab_order, counts, always=always), base)
    if halves is None:
        return curve
    losses = [budget.vocab_curve(measure, *vocabulary.keep_curve("frequency", order, always=always),
                                 base).token_loss for order, measure in (halves, halves[::-1])]
    return replace(curve, heldout_loss=(losses[0] + losses[1]) / 2)


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

def check_against_hooks(score, calib: data.Calibration, *, batch_size: int, batches: int, dtype) -> Check:
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
    if worst > rtol:
        raise CheckFailed(f"--check failed: fused scores differ from the hook reference by {worst:.3g} "
                          f"(relative to the layer maximum) in {where}, above {rtol:g}")
    return Check(sequences=n, max_rel_diff=worst, worst_layer=where, rtol=rtol, ok=True)

def _fit_statistics(stats: engine.LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gram, cross term) the re-fit solves with: the pruned stream's (sequential) or the unpruned one's."""
    if stats.cross is not None:
        return stats.shifted_gram, stats.cross
    return stats.gram, stats.mlp.down_proj.weight.detach().double() @ stats.gram


def apply(loaded: Loaded, decision: Decision) -> tuple:
    """Cut the model in memory as `decision` says (re-fitted columns first): (the model, changed in place; the
    tokenizer cut to match, or None; the report, compact_report.json's contents, the cut timed as "slicing")."""
    timings = Timings(decision.timings)
    cut = _cut(loaded, decision, timings)
    return loaded.model, cut, build_report(loaded, decision, parameters_after=models.parameter_counts(loaded.model),
                                           tokenizer=_tokenizer_fate(loaded, decision.kept_token_ids),
                                           timings=timings)


def _cut(loaded: Loaded, decision: Decision, timings: Timings):
    """The model cut in place (re-fitted columns first), timed as "slicing"; the tokenizer cut to match."""
    if loaded.offloaded:
        raise ValueError("an offloaded model (--offload layerwise) is cut by `write`, tensor by tensor")
    with timings.phase("slicing"):
        if decision.refits:
            repair.apply_refits(loaded.model, decision.kept_channels, decision.refits)
        slicing.slice_model(loaded.model, decision.kept_token_ids, decision.kept_channels)
        return cut_tokenizer(loaded, decision.kept_token_ids)


def write(loaded: Loaded, decision: Decision, out: Path, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Slice and save checkpoint, tokenizer, scores and report into a staged folder renamed to `out` at the end;
    returns the report. The model is cut in place (or, offloaded, written tensor by tensor from its files)."""
    timings = Timings(decision.timings)
    shape = models.fingerprint(loaded.model.config)  # of the model the scores belong to, before the cut
    with output.staged_dir(out, overwrite=overwrite) as tmp:
        if loaded.offloaded:
            with timings.phase("slicing"):
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
