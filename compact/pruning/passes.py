"""The engine's passes a prune runs: the prune's own (scores, the channels chosen layer by layer, their
re-fit), the planner's evidence, and --check's comparison of the fused scores with the hook path."""
from __future__ import annotations

import torch

from .. import budget, criteria, data, engine, models, repair, runs, selection
from ..loading import Loaded
from ..scoring import ScoringOptions
from .records import Check, CheckFailed, Job, Pass, Timings

CHECK_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


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


def priced_refit(job: Job) -> str:
    """The re-fit the planner prices FFN cuts with: the prune's, but none for families that normalize the MLP
    output (Gemma 2/3), where the error share the re-fit leaves on the calibration rows does not say what it
    does to the loss: on Gemma 3 270M it promised 0.51 of a 64-channel cut's error, and the sequential re-fit
    gave 1.14 of its held-out bits/byte (bench/README.md)."""
    return "none" if models.normalizes_mlp_output(job.loaded.model) else job.method.refit


def plain_scores(job: Job, calib: data.Calibration) -> tuple[dict, dict | None]:
    """(act^2 over all calibration tokens, when the planner prices a re-fit (`priced_refit`) the share of each
    layer's output error it leaves at each K, else None): the FFN evidence of the budget planner, one layer's
    Gram at a time."""
    method = job.method
    priced = priced_refit(job) != "none"

    def price(stats: engine.LayerStats) -> engine.Choice:
        return engine.Choice(left=budget.repair_left(stats.mlp.down_proj.weight.detach(), stats.scores, stats.gram,
                                                     method.ffn_multiple))

    options = engine.EngineOptions(ScoringOptions(batch_size=job.run.batch_size, progress=job.run.progress),
                                   gram=priced, host_memory=job.run.host_memory)
    outcome = engine.run(layer_source(job.loaded), calib.input_ids, calib.attention_mask, options,
                         price if priced else None, group=job.group, checkpoints=job.checkpoints.named("plan"))
    return outcome.scores, {name: c.left for name, c in outcome.choices.items()} if priced else None


def check(job: Job, calib: data.Calibration, kept_ids) -> Check:
    """--check: the engine's fused scores against its hook path on the first batches."""
    def score(ids, mask, path):
        scoring = ScoringOptions(keep_token_ids=kept_ids, batch_size=job.run.batch_size, path=path, progress=False)
        return engine.run(layer_source(job.loaded), ids, mask, engine.EngineOptions(scoring)).scores

    return check_against_hooks(score, calib, batch_size=job.run.batch_size, batches=job.run.check_batches,
                               dtype=job.loaded.dtype)


def layer_source(loaded: Loaded):
    """Where the engine finds the layers: the model in memory, or its files one layer at a time."""
    if not loaded.offloaded:
        return engine.Resident(loaded.model)
    from ..layerwise import Placement, Shards

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
