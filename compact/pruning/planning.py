"""--target-params: every vocabulary/FFN split priced (compact.budget) from the planner's pass and the token
counts, and with --plan-trials the best-priced ones pruned and measured (compact.trials)."""
from __future__ import annotations

from dataclasses import replace

import torch

from .. import budget, data, trials, vocab
from .passes import ffn_pass, plain_scores, priced_refit
from .records import Job, Pass

def split(job: Job, *, counts: torch.Tensor, halves: tuple[torch.Tensor, torch.Tensor] | None,
           calibration: data.Calibration, held_out: data.Calibration | None) -> tuple[budget.Plan, Pass | None]:
    """(the planner's record, the chosen split's trial pass or None): every split priced; with held-out rows the
    best-priced ones pruned and measured, the best measured chosen."""
    method = job.method
    scores, left = plain_scores(job, calibration)
    choice, candidates = plan_split(job, counts=counts, halves=halves, scores=scores, left=left)
    measured, chosen, trial = (None, choice, None) if held_out is None else _measure(
        job, candidates, counts=counts, calibration=calibration, held_out=held_out)
    plan = budget.Plan(target=method.target_params, rule=budget.RULE, refit=priced_refit(job),
                       candidates=budget.summary(candidates, choice=choice, chosen=chosen), measured=measured,
                       held_out=None if held_out is None else held_out.source)
    return plan, trial


def _measure(job: Job, candidates: list[budget.Candidate], *, counts: torch.Tensor, calibration: data.Calibration,
             held_out: data.Calibration) -> tuple[tuple[trials.Trial, ...], budget.Candidate, Pass]:
    """The best-priced `candidates` (compact.trials), each pruned with the prune's own pass and read on the
    held-out rows: (the trials, the best measured candidate, its pass)."""
    shortlisted, measured, passes = trials.shortlist(candidates, job.method.plan_trials), [], []
    for candidate in shortlisted:
        kept_ids = job.kept_ids(counts, candidate.vocab_keep)
        keep = candidate.ffn_keep if candidate.ffn_keep < job.intermediate else None
        passes.append(ffn_pass(job, calibration, kept_ids, keep))
        bits = trials.held_out_bits_per_byte(job.loaded, held_out, kept_ids=kept_ids,
                                             kept_channels=passes[-1].kept_channels, refits=passes[-1].refits)
        measured.append(trials.Trial(vocab_keep=candidate.vocab_keep, ffn_keep=candidate.ffn_keep,
                                     cost=candidate.cost, bits_per_byte=bits))
    measured = trials.choose(measured)
    best = next(i for i, trial in enumerate(measured) if trial.chosen)
    return measured, shortlisted[best], passes[best]


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
    cross-fitted loss: the keep order from one half of the text, the loss on the other, both ways, averaged.

    With --vocab-prior the cuts follow the blended order (the one the prune keeps), and both losses are still
    shares of the calibration text's own tokens: the FFN's loss is measured on that text too, so the two
    terms stay in one unit, and the prior, a guess about other text rather than evidence, does not make its
    own cuts look cheaper (the calibration tokens they drop are charged in full)."""
    vocabulary, method = job.vocabulary, job.method
    always = vocab.read_always_file(method.vocab_always) if method.vocab_always else ()
    base, prior = vocabulary.base_rows, method.vocab_prior
    curve = budget.vocab_curve(counts, *vocabulary.keep_curve(method.vocab_order, counts, always=always,
                                                              prior=prior), base)
    if halves is None:
        return curve
    losses = [budget.vocab_curve(measure, *vocabulary.keep_curve("frequency", order, always=always, prior=prior),
                                 base).token_loss for order, measure in (halves, halves[::-1])]
    return replace(curve, cross_fitted_loss=(losses[0] + losses[1]) / 2)
