"""The pruning job, as the method's steps: decide a `PrunePlan` (calibration -> token counts -> planner split ->
vocabulary -> scores -> channels), then report it and write the sliced checkpoint. The CLI's `score`, `plan`
and `prune` run the same steps, `decide(..., upto=...)` stopping where each needs."""
from __future__ import annotations

import itertools
import platform
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import (__version__, budget, criteria, data, engine, models, output, repair, runs, selection, slicing,
               tokenizer, trials, vocab)
from .data import CalibOptions
from .loading import Loaded
from .report import model_card
from .scoring import ChannelScorer, ScoringOptions


class CheckFailed(RuntimeError):
    """--check found the fused scores off the hook reference."""


CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class PruneOptions:
    vocab_keep: int | None = None
    ffn_keep: str | None = None
    target_params: float | None = None
    vocab_order: str = "auto"  # frequency when there is calibration data, else id
    vocab_always: str | None = None
    ffn_multiple: int = 64
    ffn_criterion: str = "common-act2"
    seed: int = 0
    scores: str | None = None
    batch_size: int = 1
    check: bool = False
    check_batches: int = 2
    refit: str = "auto"  # sequential when calibration data drives an FFN cut, else none; or one of engine.REFITS
    ffn_select: str = "scores"  # the top-K of the criterion, or "obs": elimination for the re-fit (repair.eliminate)
    plan_trials: int = 0  # --target-params: prune this many best-priced splits and keep the best measured
    overwrite: bool = False
    progress: bool | None = None


class Timings(dict):
    """Seconds per phase, in the order the phases ran."""

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)


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


def original_ids(report: dict) -> tuple[list[int], int]:
    """(the original id of each token of a pruned model, the original vocabulary size) from its report: the
    composition of every prune since the original (`original_token_ids`), or the one prune's kept ids."""
    if "original_token_ids" in report:
        return report["original_token_ids"], report["vocab_original"]
    return report["kept_token_ids"], report["sizes"]["vocab_before"]


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


STEPS = ("calibration", "token counts", "planning", "vocabulary", "scoring", "selection")


@dataclass
class PrunePlan:
    """What a prune keeps and why: the inputs, then each step's decision (None until `decide` runs the step)."""

    loaded: Loaded
    opts: PruneOptions
    calib_opts: CalibOptions
    run: runs.RunOptions | None = None
    upto: str = "selection"  # the last step `decide` runs: "planning" for `compact plan`, "scoring" for `score`
    timings: Timings = field(default_factory=Timings)
    calibration: data.Calibration | None = None
    counts: torch.Tensor | None = None
    halves: tuple | None = None  # counts over alternate halves of the text (the planner's cross-fit)
    planner: dict | None = None  # --target-params: the rule, the candidates weighed and the choice
    vocab_keep: int | None = None
    ffn_keep: int | None = None  # channels per layer (None until resolved)
    kept_token_ids: list[int] | None = None  # None: vocabulary not cut
    scores: dict | None = None
    check: dict | None = None  # --check: fused vs hooks
    kept_channels: dict | None = None  # None: FFN not cut
    refits: dict | None = None  # re-fitted down_proj columns [D, K] per cut MLP (compact.repair)
    held_out: data.Calibration | None = None  # calibration rows after --samples: the planner's measuring rows
    trial: tuple | None = None  # the chosen split's measured trial: ffn_pass' (scores, kept channels, refits)
    parameters_before: dict | None = None

    @property
    def model(self):
        return self.loaded.model

    @property
    def intermediate(self) -> int:
        return models.intermediate_size(self.model)

    def runs_step(self, step: str) -> bool:
        return STEPS.index(step) <= STEPS.index(self.upto)

    @property
    def ffn_cut(self) -> bool:
        """The FFN loses channels (for `score`: scores are the point)."""
        return self.upto == "scoring" or (self.ffn_keep is not None and self.ffn_keep < self.intermediate)

    @property
    def data_scores(self) -> bool:
        """Scores come from a pass over calibration data (not a file, not a data-free criterion)."""
        return self.opts.scores is None and self.opts.ffn_criterion not in criteria.DATA_FREE


def decide(loaded: Loaded, opts: PruneOptions, calib_opts: CalibOptions, run: runs.RunOptions | None = None, *,
           upto: str = "selection") -> PrunePlan:
    """Run the steps up to `upto` (one of STEPS), each only when the options need it; every step that runs is
    timed. Nothing is written."""
    if upto not in STEPS:
        raise ValueError(f"upto must be one of {STEPS}, got {upto!r}")
    if opts.vocab_order == "auto":
        opts = replace(opts, vocab_order="frequency" if calib_opts.path else "id")
    plan = PrunePlan(loaded, opts, calib_opts, run, upto)
    plan.vocab_keep, plan.ffn_keep = opts.vocab_keep, _resolve_targets(plan)
    asked_refit = opts.refit
    plan.opts = opts = replace(opts, refit=_resolve_refit(plan))
    for step, needed, action in _steps(plan):
        if plan.runs_step(step) and needed():
            with plan.timings.phase(step):
                action(plan)
    _warn_idle(plan, asked_refit)
    return plan


def _warn_idle(plan: PrunePlan, asked_refit: str) -> None:
    """Options the run had nothing to apply to are said, not silently dropped."""
    if plan.upto != "selection":
        return
    if plan.opts.check and plan.check is None:
        warnings.warn("--check compares the calibration pass's fused scores with hooks; this prune ran none "
                      "(vocabulary only, --scores, or a data-free criterion): nothing was checked", stacklevel=3)
    if asked_refit not in ("auto", "none") and not plan.refits:
        warnings.warn(f"--refit {asked_refit} re-fits kept FFN channels; this prune cuts none: nothing was re-fitted",
                      stacklevel=3)


def _steps(plan: PrunePlan):
    """(step, is it needed now, what it does), in order; the conditions read what earlier steps decided."""
    opts = plan.opts
    counted = opts.target_params is not None or (opts.vocab_order == "frequency" and opts.vocab_keep is not None)
    return [
        ("calibration", lambda: opts.target_params is not None or (plan.data_scores and plan.ffn_cut), _calibrate),
        ("token counts", lambda: counted, _count),
        ("planning", lambda: opts.target_params is not None, _split),
        ("vocabulary", lambda: True, _vocabulary),
        ("scoring", lambda: opts.scores is None and plan.ffn_cut, _score),
        ("selection", lambda: True, _select),
    ]


def _calibrate(plan: PrunePlan) -> None:
    """The calibration rows; for measured planning also up to a quarter as many more, held out from the fit."""
    opts = plan.calib_opts
    if not trials.wanted(plan) or _batch_major(plan):
        plan.calibration = calibrate(plan.loaded, opts, plan.opts.progress)
        return
    rows = calibrate(plan.loaded, replace(opts, samples=opts.samples + trials.held_rows(opts.samples)),
                     plan.opts.progress)
    plan.calibration, plan.held_out = trials.split_rows(rows, opts.samples)


def _count(plan: PrunePlan) -> None:
    plan.counts = token_counts(plan.loaded, plan.calib_opts, plan.opts.progress)
    if plan.opts.target_params is not None and plan.opts.vocab_order == "frequency":
        plan.halves = tuple(token_counts(plan.loaded, plan.calib_opts, False, part) for part in (0, 1))


def _split(plan: PrunePlan) -> None:
    """Price every split; with held-out rows, prune the best-priced ones and keep the best measured."""
    evidence = plain_scores(plan.loaded, plan.calibration, plan.opts)
    choice, candidates, plan.planner = plan_split(plan.loaded, (plan.counts, plan.halves), evidence, plan.opts)
    plan.vocab_keep, plan.ffn_keep = choice.vocab_keep, choice.ffn_keep
    plan.planner["refit"] = plan.opts.refit
    if plan.held_out is not None:
        trials.measure(plan, candidates, (lambda n: _kept_ids(plan, n), ffn_pass))


def _vocabulary(plan: PrunePlan) -> None:
    plan.kept_token_ids = _kept_ids(plan, plan.vocab_keep)


def _kept_ids(plan: PrunePlan, vocab_keep: int | None) -> list[int] | None:
    always = vocab.read_always_file(plan.opts.vocab_always) if plan.opts.vocab_always else ()
    return vocab.kept_vocabulary(plan.model, plan.loaded.tokenizer, vocab_keep, order=plan.opts.vocab_order,
                                 counts=plan.counts, always=always)


def _select(plan: PrunePlan) -> None:
    """Channels from a scores file or a data-free criterion (a calibration pass selects as it goes)."""
    plan.parameters_before = models.parameter_counts(plan.model)
    if plan.opts.scores:
        plan.scores = output.load_scores(plan.opts.scores, {n: plan.intermediate for n in models.mlps(plan.model)},
                                         models.fingerprint(plan.model.config))
    if plan.ffn_keep < plan.intermediate and plan.kept_channels is None:
        plan.kept_channels = selection.select_channels(plan.scores, plan.ffn_keep)


def _resolve_targets(plan: PrunePlan) -> int | None:
    """Validate what to prune (not for `score` or `plan`); the FFN keep count (None when planned)."""
    opts = plan.opts
    criteria.check_criterion(opts.ffn_criterion)
    if opts.refit not in ("auto", *engine.REFITS):
        raise ValueError(f"--refit must be auto, {', '.join(engine.REFITS)}; got {opts.refit!r}")
    if opts.ffn_select not in SELECTIONS:
        raise ValueError(f"--ffn-select must be one of {', '.join(SELECTIONS)}; got {opts.ffn_select!r}")
    fitted = opts.refit not in ("auto", "none") or opts.ffn_select == "obs"
    if fitted and (opts.scores or opts.ffn_criterion in criteria.DATA_FREE):
        raise ValueError("--refit and --ffn-select obs fit down_proj on the calibration pass: they need --calib and "
                         "a data-driven --ffn-criterion (not --scores or magnitude/random)")
    if fitted and _batch_major(plan):
        raise ValueError("--checkpoint-every, --resume and torchrun score batch by batch; the re-fit runs layer by "
                         "layer: add --refit none (and --ffn-select scores)")
    if plan.upto != "selection":
        return None
    if opts.target_params is not None and (opts.vocab_keep or opts.ffn_keep):
        raise ValueError("give --target-params, or --vocab-keep/--ffn-keep, not both")
    if opts.target_params is None and opts.vocab_keep is None and opts.ffn_keep is None:
        raise ValueError("nothing to prune: give --vocab-keep and/or --ffn-keep, or --target-params")
    if opts.ffn_keep is None:
        return None if opts.target_params else plan.intermediate
    return selection.resolve_ffn_keep(opts.ffn_keep, plan.intermediate, opts.ffn_multiple)


SELECTIONS = ("scores", "obs")


def _resolve_refit(plan: PrunePlan) -> str:
    """--refit auto: sequential when calibration data drives an FFN cut (or the planner may cut), else none."""
    opts = plan.opts
    if opts.refit != "auto":
        return opts.refit
    may_cut = opts.target_params is not None or (plan.ffn_keep is not None and plan.ffn_keep < plan.intermediate)
    data_driven = plan.data_scores and plan.calib_opts.path is not None
    fits = plan.upto in ("planning", "selection") and not _batch_major(plan)
    return "sequential" if may_cut and data_driven and fits else "none"


def _batch_major(plan: PrunePlan) -> bool:
    """Checkpointed, resumed or torchrun scoring (or an interrupted run's checkpoint waiting for --resume): the
    model-major pass of compact.runs, batch by batch."""
    run = plan.run
    waiting = run is not None and run.checkpoint is not None and Path(run.checkpoint).exists()
    return run is not None and bool(run.every or run.resume or waiting or runs.distributed()[1] > 1)


def layer_source(loaded: Loaded):
    """Where the engine finds the layers: the model in memory, or its files one layer at a time."""
    if not loaded.offloaded:
        return engine.Resident(loaded.model)
    from .layerwise import Placement, Shards

    return Shards(loaded.source, Placement(device=loaded.device, dtype=loaded.dtype))


def plain_scores(loaded: Loaded, calib: data.Calibration, opts: PruneOptions) -> tuple[dict, dict | None]:
    """(act^2 over all calibration tokens, with a re-fit the share of each layer's output error it leaves at
    each K or None): the FFN evidence of the budget planner, one layer's Gram at a time."""
    left = {} if opts.refit != "none" else None

    def price(stats: engine.LayerStats) -> None:
        if left is not None:
            left[stats.name] = budget.repair_left(stats.mlp.down_proj.weight.detach(), stats.scores, stats.gram,
                                                  opts.ffn_multiple)

    options = engine.EngineOptions(ScoringOptions(batch_size=opts.batch_size, progress=opts.progress),
                                   gram=left is not None)
    outcome = engine.run(layer_source(loaded), calib.input_ids, calib.attention_mask, options, price)
    return outcome.scores, left


def _activation_pass(model, calib: data.Calibration, kept_ids, opts: PruneOptions,
                     run: runs.RunOptions | None = None) -> ChannelScorer:
    """One model-major pass over the calibration data (checkpoints, torchrun): common and plain act^2."""
    scorer = ChannelScorer(model, keep_token_ids=kept_ids, plain=True)
    runs.run(scorer, calib.input_ids, calib.attention_mask, batch_size=opts.batch_size, progress=opts.progress,
             opts=run)
    return scorer


def plan_split(loaded: Loaded, counts: tuple, evidence: tuple, opts: PruneOptions) -> tuple:
    """(the cheapest candidate, every candidate, the planner's report) for --target-params, by the rule in compact.budget, pricing each
    vocabulary cut by the rows and tokens `vocab.kept_vocabulary` really keeps, and each FFN cut by its act^2
    share (times the error share the re-fit leaves, with a re-fit). `counts`: (all, halves or None);
    `evidence`: plain_scores' pair."""
    model = loaded.model
    curve = _vocab_curve(loaded, counts, opts)
    plain, left = evidence
    ffn_curve = budget.score_loss_curve(plain, left)
    choice, candidates = budget.plan(budget.accounting(model), opts.target_params, curve, ffn_curve,
                                     opts.ffn_multiple)
    return choice, candidates, {"target": opts.target_params, "rule": budget.RULE,
                                "candidates": budget.summary(choice, candidates)}


def _vocab_curve(loaded: Loaded, counts: tuple, opts: PruneOptions) -> budget.VocabCurve:
    """Rows kept and calibration tokens dropped at every N; in frequency order also the cross-fitted loss: the
    keep order from one half of the text, the loss on the other, both ways, averaged."""
    tok, (counts, halves) = loaded.tokenizer, counts
    rows = loaded.model.get_input_embeddings().num_embeddings
    always = vocab.read_always_file(opts.vocab_always) if opts.vocab_always else ()
    regular = vocab.regular_ids(tok, rows)
    base = len(vocab.kept_vocabulary(loaded.model, tok, len(regular), order=opts.vocab_order,
                                     counts=counts)) - len(regular)
    curve = budget.vocab_curve(counts, *vocab.keep_curve(tok, rows, opts.vocab_order, counts, always=always), base)
    if halves is not None:
        losses = [budget.vocab_curve(measure, *vocab.keep_curve(tok, rows, "frequency", order, always=always),
                                     base).token_loss for order, measure in (halves, halves[::-1])]
        curve.heldout_loss = (losses[0] + losses[1]) / 2
    return curve


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


def _score(plan: PrunePlan) -> None:
    """Scores by the criterion; for a prune, the kept channels and their re-fit, chosen layer by layer in the
    engine's pass (model-major with checkpoints or torchrun); the --check result."""
    loaded, opts, calib, kept_ids = plan.loaded, plan.opts, plan.calibration, plan.kept_token_ids
    if opts.ffn_criterion in criteria.DATA_FREE:
        if loaded.offloaded:
            raise ValueError(f"--ffn-criterion {opts.ffn_criterion} needs the weights: drop --offload layerwise")
        plan.scores = criteria.data_free_scores(loaded.model, opts.ffn_criterion, opts.seed)
        return
    if loaded.offloaded and _batch_major(plan):
        raise ValueError("--offload layerwise runs in one process without checkpoints")
    if opts.check:
        def score(ids, mask, path):
            scoring = ScoringOptions(keep_token_ids=kept_ids, batch_size=opts.batch_size, path=path)
            options = engine.EngineOptions(replace(scoring, progress=False))
            return engine.run(layer_source(loaded), ids, mask, options).scores

        plan.check = check_against_hooks(score, calib, batch_size=opts.batch_size, batches=opts.check_batches,
                                         dtype=loaded.model.get_input_embeddings().weight.dtype)
    if _batch_major(plan):
        scorer = _activation_pass(loaded.model, calib, kept_ids, opts, plan.run)
        plan.scores = criteria.from_activations(loaded.model, opts.ffn_criterion, scorer.scores, scorer.plain_scores)
        return
    if plan.trial is not None:  # the planner's measured trial of this split ran this very pass
        plan.scores, kept, plan.refits = plan.trial
        plan.kept_channels = kept or None
        return
    cut = plan.upto == "selection" and plan.ffn_keep is not None and plan.ffn_keep < plan.intermediate
    plan.scores, kept, refits = ffn_pass(loaded, opts, calib, kept_ids, plan.ffn_keep if cut else None, plan.timings)
    if cut:
        plan.kept_channels, plan.refits = kept, refits


def ffn_pass(loaded: Loaded, opts: PruneOptions, calib: data.Calibration, kept_ids, keep: int | None,
             timings: Timings | None = None) -> tuple:
    """The engine's pass: (scores by the criterion, kept channels, re-fitted columns); `keep` channels per layer
    chosen as it goes (None: scores only). The seconds the choice and the re-fit took inside the pass go to
    `timings` as "scoring: choice" and "scoring: re-fit" (parts of the scoring phase)."""
    scores = {}

    def choose(stats: engine.LayerStats) -> list[int] | None:
        scores[stats.name] = criteria.layer_scores(stats, opts.ffn_criterion)
        if keep is None:
            return None
        if opts.ffn_select == "obs":
            gram, cross = _fit_statistics(stats)
            return repair.eliminate(stats.mlp.down_proj.weight.detach(), cross, gram, keep)
        return selection.top_channels(scores[stats.name], keep, stats.name)

    scoring = ScoringOptions(keep_token_ids=kept_ids, batch_size=opts.batch_size, progress=opts.progress)
    options = engine.EngineOptions(scoring, plain=opts.ffn_criterion != "common-act2", refit=opts.refit,
                                   gram=opts.ffn_select == "obs")
    outcome = engine.run(layer_source(loaded), calib.input_ids, calib.attention_mask, options, choose)
    for part, seconds in outcome.seconds.items() if timings is not None and keep is not None else ():
        timings[f"scoring: {part}"] = round(seconds, 4)
    return scores, outcome.kept, outcome.refits


def _fit_statistics(stats: engine.LayerStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gram, cross term) the re-fit solves with: the pruned stream's (sequential) or the unpruned one's."""
    if stats.cross is not None:
        return stats.shifted_gram, stats.cross
    return stats.gram, stats.mlp.down_proj.weight.detach().double() @ stats.gram


def output_dtype(loaded: Loaded) -> torch.dtype:
    """What a prune writes: --dtype when given, else the dtype the source is stored in (the compute dtype when
    that is unknown: GGUF, llama2.c, pickled weights), in memory and offloaded alike."""
    return loaded.output_dtype or loaded.dtype


def versions() -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"compact": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version()}


def report(plan: PrunePlan) -> dict:
    """compact_report.json of a decided plan, less the parameters after slicing (added by `write`)."""
    loaded, opts, model = plan.loaded, plan.opts, plan.model
    vocab_before = model.get_input_embeddings().num_embeddings
    kept_ids = plan.kept_token_ids
    channels = plan.kept_channels or {name: list(range(plan.intermediate)) for name in models.mlps(model)}
    return {
        "source": loaded.source, "calibration": plan.calibration.source if plan.calibration else None,
        "scores_file": opts.scores, "ffn_criterion": None if opts.scores else opts.ffn_criterion,
        "vocab_order": opts.vocab_order, "plan": plan.planner, "offload": "layerwise" if loaded.offloaded else "none",
        "dtype": {"compute": str(loaded.dtype).removeprefix("torch."),
                  "output": str(output_dtype(loaded)).removeprefix("torch.")},
        "options": {**asdict(opts), **{f"calib_{k}": v for k, v in asdict(plan.calib_opts).items()},
                    **_calib_used(plan.calibration)},
        "sizes": {"vocab_before": vocab_before, "vocab_after": len(kept_ids) if kept_ids else vocab_before,
                  "intermediate_before": plan.intermediate, "intermediate_after": plan.ffn_keep,
                  "layers": len(channels), "hidden": model.config.hidden_size},
        "parameters": {"before": plan.parameters_before},
        "checks": {"scores_vs_hooks": plan.check}, "timings_s": plan.timings, "versions": versions(),
        "kept_token_ids": kept_ids if kept_ids is not None else list(range(vocab_before)),
        "kept_channels": list(channels.values()),
        "gguf_tokenizer": loaded.gguf_tokenizer or (loaded.report or {}).get("gguf_tokenizer"),
        **_composition(loaded, kept_ids if kept_ids is not None else range(vocab_before)),
    }


def _composition(loaded: Loaded, kept_ids) -> dict:
    """For a model compact pruned before: each new token's id in the original model (before every prune) and
    the original vocabulary size, so that token-id data in original ids keeps its meaning."""
    if loaded.report_damaged:
        warnings.warn(f"{loaded.report_damaged}; the new report's ids are relative to this model only", stacklevel=3)
    if loaded.report is None:
        return {}
    previous, vocab = original_ids(loaded.report)
    return {"original_token_ids": [previous[i] for i in kept_ids], "vocab_original": vocab}


def _calib_used(calib) -> dict:
    """The calibration shape really used (--seq-len is capped at the context, --samples at the data)."""
    if calib is None:
        return {}
    samples, seq_len = calib.input_ids.shape
    return {"calib_samples": samples, "calib_seq_len": seq_len}


def write(plan: PrunePlan, out: Path) -> dict:
    """Slice and save checkpoint, tokenizer, scores and report into a staged folder renamed to `out` at the end;
    returns the report. The model is sliced in place (or, offloaded, written tensor by tensor from its files)."""
    model, timings = plan.model, plan.timings
    shape = models.fingerprint(model.config)  # of the model the scores belong to, before slicing
    result = report(plan)
    with output.staged_dir(out, overwrite=plan.opts.overwrite) as tmp:
        with timings.phase("slicing"):
            result["parameters"]["after"] = _slice(plan, tmp)
        with timings.phase("save"):
            if not plan.loaded.offloaded:
                model.to(output_dtype(plan.loaded)).save_pretrained(tmp, safe_serialization=True)
            result["tokenizer"] = save_tokenizer(plan.loaded, plan.kept_token_ids, tmp)
            if plan.scores is not None:
                output.save_scores(plan.scores, tmp / "compact_scores.safetensors", shape)
        output.write_json(tmp / "compact_report.json", result)
        (tmp / "README.md").write_text(model_card(result), encoding="utf-8")
    return result


def _slice(plan: PrunePlan, folder: Path) -> dict:
    """Apply the kept ids and channels; the parameter counts after. Offloaded: the pruned shards go to `folder`."""
    refits = {f"{name}.down_proj.weight": columns for name, columns in (plan.refits or {}).items()}
    if plan.loaded.offloaded:
        from .layerwise_slicing import write_layerwise

        summary = write_layerwise(plan.loaded.source, folder, plan.kept_token_ids, plan.kept_channels,
                                  device=plan.loaded.device, progress=plan.opts.progress, replacements=refits,
                                  dtype=output_dtype(plan.loaded))
        return summary["parameters"]["after"]
    if refits:
        repair.apply_refits(plan.model, plan.kept_channels, plan.refits)
    slicing.slice_model(plan.model, plan.kept_token_ids, plan.kept_channels)
    return models.parameter_counts(plan.model)


def prune(loaded: Loaded, out: Path, opts: PruneOptions, calib_opts: CalibOptions,
          run: runs.RunOptions | None = None) -> dict:
    """Decide and write: prune `loaded` (modified in place) into `out`; returns the report."""
    return write(decide(loaded, opts, calib_opts, run), out)


def save_tokenizer(loaded: Loaded, kept_ids: list[int] | None, folder: Path) -> str | None:
    """The tokenizer cut to `kept_ids` (None: the vocabulary is not cut, the tokenizer is saved as it is, whatever
    its type) into `folder`; what the report records. A warning when there is none."""
    if loaded.tokenizer is None:
        warnings.warn("the model has no tokenizer: the pruned checkpoint is written without one", stacklevel=2)
        return None
    if kept_ids is None:
        loaded.tokenizer.save_pretrained(folder)
        return "unchanged (vocabulary not cut)"
    tokenizer.prune_tokenizer(loaded.tokenizer, kept_ids).save_pretrained(folder)
    return "pruned to kept_token_ids"
