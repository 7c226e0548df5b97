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

from dataclasses import asdict, dataclass

import torch

from . import models


@dataclass
class Accounting:
    """Parameters as fixed + rows * per_row + channels * per_channel."""

    total: int
    fixed: int
    per_row: int
    per_channel: int
    forced_rows: int  # rows kept whatever N (specials, byte tokens)
    regular: int
    intermediate: int

    def parameters(self, vocab_keep: int, ffn_keep: int) -> int:
        return self.fixed + (vocab_keep + self.forced_rows) * self.per_row + ffn_keep * self.per_channel


@dataclass
class Candidate:
    vocab_keep: int
    ffn_keep: int
    parameters: int
    fraction: float
    token_loss: float
    score_loss: float

    @property
    def cost(self) -> float:
        return self.token_loss + self.score_loss


def accounting(model, regular: int, forced_rows: int) -> Accounting:
    counts = models.parameter_counts(model)
    rows = model.get_input_embeddings().num_embeddings
    intermediate = models.intermediate_size(model)
    vocab_params = counts["embedding"] + counts["head"]
    fixed = counts["total"] - vocab_params - counts["ffn"]
    return Accounting(counts["total"], fixed, vocab_params // rows, counts["ffn"] // intermediate,
                      forced_rows, regular, intermediate)


RULE = ("keep the target fraction of parameters; among the splits that do, take the least "
        "token_loss(N) + score_loss(K) (calibration token mass dropped + mean act^2 mass dropped)")


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


def score_loss_curve(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """[I+1] mean over layers of the act^2 share outside the top-K channels, for K = 0..I."""
    curves = [loss_curve(torch.sort(s.double().cpu(), descending=True).values) for s in scores.values()]
    return torch.stack(curves).mean(0)


def plan(acc: Accounting, target: float, token_curve: torch.Tensor, scores: dict[str, torch.Tensor],
         multiple: int = 64) -> tuple[Candidate, list[Candidate]]:
    """(choice, candidates): the splits within 1% of `target` and the least costly of them."""
    if not 0 < target <= 1:
        raise ValueError(f"--target-params must be in (0, 1], got {target}")
    budget = target * acc.total
    score_curve = score_loss_curve(scores)
    candidates = []
    for ffn_keep in range(acc.intermediate, 0, -multiple):
        vocab_keep = int((budget - acc.fixed - ffn_keep * acc.per_channel) // acc.per_row) - acc.forced_rows
        vocab_keep = min(vocab_keep, acc.regular)
        params = acc.parameters(vocab_keep, ffn_keep)
        if vocab_keep < 1 or abs(params / acc.total - target) > 0.01:
            continue  # no vocabulary size lands this FFN size within 1% of the target
        candidates.append(Candidate(vocab_keep, ffn_keep, params, params / acc.total,
                                    float(token_curve[vocab_keep]), float(score_curve[ffn_keep])))
    if not candidates:
        smallest = acc.parameters(1, multiple) / acc.total
        raise ValueError(f"--target-params {target} cannot be met within 1%: splits keep between "
                         f"{smallest:.1%} and 100% of the parameters in steps too coarse here "
                         f"(try a smaller --ffn-multiple)")
    return min(candidates, key=lambda c: (c.cost, -c.ffn_keep)), candidates


def summary(choice: Candidate, candidates: list[Candidate], rows: int = 12) -> list[dict]:
    """About `rows` evenly spaced candidates plus the choice, as dicts for tables and the report."""
    step = max(1, len(candidates) // rows)
    shown = candidates[::step]
    if choice not in shown:
        shown = sorted(shown + [choice], key=lambda c: -c.ffn_keep)
    return [{**asdict(c), "cost": c.cost, "chosen": c is choice} for c in shown]
