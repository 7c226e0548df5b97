"""Budget planner: split a parameter budget between vocabulary rows and FFN channels from measured evidence.

Rule: among all (N, K) that keep the target fraction of parameters (K a multiple of --ffn-multiple, N solved
for it), choose the one with the least measured loss, token_loss(N) + score_loss(K):
- token_loss(N): the share of calibration tokens whose ids the vocabulary cut drops (from frequency counts);
- score_loss(K): the share of act^2 mass outside the top-K channels, averaged over layers (from the scores).
Parameter accounting does the rest: a kept vocabulary row costs D (tied) or 2D parameters, a kept channel
3·L·D, so small models (where 2VD dominates 3LDI) reach a target mostly by cutting vocabulary, whose rare tail
holds little token mass, and large models mostly by cutting FFN channels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from . import models, repair


@dataclass(frozen=True)
class Accounting:
    """Parameters as fixed + rows * per_row + channels * per_channel."""

    total: int
    fixed: int
    per_row: int
    per_channel: int
    intermediate: int

    def parameters(self, rows: int, ffn_keep: int) -> int:
        return self.fixed + rows * self.per_row + ffn_keep * self.per_channel


@dataclass(frozen=True)
class VocabCurve:
    """What a vocabulary cut keeps, for every `--vocab-keep` N in 0..regular: the embedding rows (the cut, plus
    every row kept whatever N) and the share of calibration tokens dropped."""

    rows: torch.Tensor  # [regular + 1] int64, nondecreasing
    token_loss: torch.Tensor  # [regular + 1] float64
    # frequency order: the loss cross-fitted on halves of the calibration text (the order chosen on one half,
    # the loss measured on the other), which the in-sample token_loss underestimates; the cost uses it
    cross_fitted_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class Candidate:
    """One split (N, K) the planner weighs, priced; `chosen`: the plan's choice (in a `Plan`'s candidates)."""

    vocab_keep: int
    vocab_rows: int
    ffn_keep: int
    parameters: int
    fraction: float
    token_loss: float
    score_loss: float
    cross_fitted_loss: float | None = None
    chosen: bool = False

    @property
    def cost(self) -> float:
        return (self.token_loss if self.cross_fitted_loss is None else self.cross_fitted_loss) + self.score_loss

    def to_json(self) -> dict:
        """The report's candidate row: the fields, then the cost and the chosen flag."""
        row = asdict(self)
        chosen = row.pop("chosen")
        return {**row, "cost": self.cost, "chosen": chosen}


@dataclass(frozen=True)
class Plan:
    """The planner's record for --target-params: the target fraction, the rule, the re-fit it priced with, the
    candidates shown (exactly one `chosen`), and with --plan-trials the measured trials (`trials.Trial`) and the
    held-out rows they were read on."""

    target: float
    rule: str
    refit: str
    candidates: tuple[Candidate, ...]
    measured: tuple | None = None
    held_out: str | None = None

    @property
    def chosen(self) -> Candidate:
        return next(c for c in self.candidates if c.chosen)

    def to_json(self) -> dict:
        """compact_report.json's "plan"."""
        trials = {} if self.measured is None else {"measured": [asdict(t) for t in self.measured],
                                                   "held_out": self.held_out}
        return {"target": self.target, "rule": self.rule, "candidates": [c.to_json() for c in self.candidates],
                "refit": self.refit, **trials}


def accounting(model) -> Accounting:
    counts = models.parameter_counts(model)
    rows = model.get_input_embeddings().num_embeddings
    intermediate = models.intermediate_size(model)
    vocab_params = counts["embedding"] + counts["head"]
    fixed = counts["total"] - vocab_params - counts["ffn"]
    return Accounting(counts["total"], fixed, vocab_params // rows, counts["ffn"] // intermediate, intermediate)


def vocab_curve(counts: torch.Tensor, keep_ids: list[int], prefix: list[int], base_rows: int) -> VocabCurve:
    """The curve of a cut that keeps the first `prefix[N]` of `keep_ids` (regular ids,
    compact.vocab.Vocabulary.keep_curve) plus `base_rows` rows that are never cut (special and added tokens)."""
    prefix = torch.as_tensor(prefix, dtype=torch.long)
    return VocabCurve(prefix + base_rows, token_loss_curve(counts, keep_ids)[prefix])


RULE = ("keep the target fraction of parameters; among the splits that do, take the least "
        "token_loss(N) + score_loss(K) (calibration token mass dropped, cross-fitted on halves of the text in "
        "frequency order, + mean act^2 mass dropped; with a "
        "re-fit, each layer's act^2 share times the share of its output error the same-input re-fit leaves)")


def token_loss_curve(counts: torch.Tensor, keep_order: list[int]) -> torch.Tensor:
    """[n+1] share of all calibration tokens dropped when keeping the first 0..n regular ids of `keep_order`
    (tokens outside it, the specials and byte tokens, are never dropped)."""
    counts = counts.double().cpu()
    mass = counts[torch.as_tensor(keep_order, dtype=torch.long)]
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
    return (mass.sum() - kept) / (counts.sum() if counts.sum() > 0 else 1.0)


def loss_curve(mass: torch.Tensor) -> torch.Tensor:
    """[n+1] share of the total mass lost when keeping the first 0..n entries of `mass` (in keep order)."""
    mass = mass.double().cpu()
    total = float(mass.sum()) or 1.0
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)])
    return 1.0 - kept / total


def score_loss_curve(scores: dict[str, torch.Tensor], left: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[I+1] mean over layers of the act^2 share outside the top-K channels, for K = 0..I. With `left` ({name:
    [I+1]}, the share of the output error the down_proj repair leaves at each K), each layer's share times it."""
    curves = [loss_curve(torch.sort(s.double().cpu(), descending=True).values) for s in scores.values()]
    if left is not None:
        curves = [c * left[name].double().cpu() for c, name in zip(curves, scores)]
    return torch.stack(curves).mean(0)


def ffn_sizes(intermediate: int, multiple: int) -> list[int]:
    """The FFN sizes the planner weighs, largest first: all channels, then every multiple of `multiple` below."""
    return [intermediate] + list(range((intermediate - 1) // multiple * multiple, 0, -multiple))


def repair_left(weight: torch.Tensor, scores: torch.Tensor, gram: torch.Tensor, multiple: int,
                points: int = 6) -> torch.Tensor:
    """[I+1]: the share of one layer's output error the re-fit (compact.repair) leaves when the top-K channels
    (by `scores`) stay. Solved exactly at `points` channel counts spread over the ones the planner weighs
    (multiples of `multiple` below I; each solve costs ~K^3), linear between them; 1.0 at K = I and 0."""
    size = scores.numel()
    ks = ffn_sizes(size, multiple)[1:]
    exact = sorted({ks[round(i * (len(ks) - 1) / max(points - 1, 1))] for i in range(points)}) if ks else []
    order = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
    curve = torch.ones(size + 1, dtype=torch.float64)
    values = [repair.error_left(weight, gram, order[:k].sort().values.to(gram.device)) for k in exact]
    for k in ks:
        curve[k] = float(np.interp(k, exact, values))
    return curve


def choose_split(acc: Accounting, target: float, vocab: VocabCurve, score_curve: torch.Tensor,
                 multiple: int = 64) -> tuple[Candidate, list[Candidate]]:
    """(choice, candidates): for each FFN size, the largest vocabulary cut whose rows fit the rest of the budget,
    if that lands within 1% of `target`; the choice is the least costly of them. `score_curve`: [I+1] FFN loss
    by channels kept (score_loss_curve)."""
    if not 0 < target <= 1:
        raise ValueError(f"--target-params must be in (0, 1], got {target}")
    budget = target * acc.total
    candidates = []
    for ffn_keep in ffn_sizes(acc.intermediate, multiple):
        room = (budget - acc.fixed - ffn_keep * acc.per_channel) // acc.per_row
        vocab_keep = int(torch.searchsorted(vocab.rows, torch.tensor([int(room)]), right=True)) - 1
        if vocab_keep < 1:
            continue
        rows = int(vocab.rows[vocab_keep])
        params = acc.parameters(rows, ffn_keep)
        if abs(params / acc.total - target) > 0.01:
            continue  # no vocabulary size lands this FFN size within 1% of the target
        crossed = None if vocab.cross_fitted_loss is None else float(vocab.cross_fitted_loss[vocab_keep])
        candidates.append(Candidate(vocab_keep, rows, ffn_keep, params, params / acc.total,
                                    float(vocab.token_loss[vocab_keep]), float(score_curve[ffn_keep]), crossed))
    if not candidates:
        smallest = acc.parameters(int(vocab.rows[1]), multiple) / acc.total
        raise ValueError(f"--target-params {target} cannot be met within 1%: splits keep between "
                         f"{smallest:.1%} and 100% of the parameters in steps too coarse here "
                         f"(try a smaller --ffn-multiple)")
    return min(candidates, key=lambda c: (c.cost, -c.ffn_keep)), candidates


def summary(candidates: list[Candidate], *, choice: Candidate, chosen: Candidate | None = None,
            rows: int = 12) -> tuple[Candidate, ...]:
    """About `rows` evenly spaced candidates plus the priced `choice` and the `chosen` one (the choice unless
    measured planning chose another), largest FFN first, `chosen` flagged: the candidates a `Plan` shows."""
    chosen = chosen or choice
    shown = candidates[::max(1, len(candidates) // rows)]
    for extra in (choice, chosen):
        if extra not in shown:
            shown = sorted(shown + [extra], key=lambda c: -c.ffn_keep)
    return tuple(replace(c, chosen=c == chosen) for c in shown)
