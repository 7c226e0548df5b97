"""Closed-form repair of down_proj after dropping FFN channels (no retraining).

A layer's MLP output is W h (W = down_proj's weight [hidden, I], h its input). Keeping only the channels K
(dropping D), the kept columns are re-fitted by least squares over the calibration positions so that W' h_K
matches W h:

    W' = argmin sum_t w_t ||W h_t - W' h_{t,K}||^2 = W_K + W_D G[D, K] G[K, K]^-1,   G = sum_t w_t h_t h_t^T

with the token weights w_t of common act^2 (so diag G is the scores) and a ridge of `ridge` x mean(diag
G[K, K]) added to G[K, K]. G comes from the scoring pass itself (`ChannelScorer(gram=True)`): I^2 float64
numbers per layer, one [I, T] x [T, I] product per layer and batch. For Llama-3.1-8B (I = 14336, 32 layers):
1.64 GB per layer (52.6 GB for all layers at once), 2 T I^2 = 13.5 TFLOP per layer for T = 32k calibration
tokens (431 TFLOP in all: ~7 s at an H100's 67 TFLOP/s fp32); the solves are ~K^3/3 each, under 1 TFLOP.

`reconstruct` (--refit mlp) goes past the closed form: the kept rows of gate/up and columns of down together,
by full-batch Adam on the pruned stream's MLP inputs and targets, stopped on held-out calibration rows. Each
step costs 6 T D K FLOP forward and backward (T training tokens of this rank), plus 2 T D K for the held-out
loss; memory: x' and r of one layer (2 T D float32) and the kept weights with Adam's two moments (9 K D float32).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import models

log = logging.getLogger(__name__)

RIDGE = 0.3  # SmolLM2-135M, FFN 960 of 1536 channels, 16 x 512: sequential 1e-2 +0.155, 0.1 +0.137, 0.3 +0.130,
# 1.0 +0.131 bits/byte; same-input 1e-2 +0.149, 0.1 +0.145, 0.3 +0.148 (bench/results/refit_research.csv)


# --refit mlp (`reconstruct`): Adam on the kept rows of gate/up and columns of down, from the closed form.
MLP_STEPS = 16  # full-batch steps per layer; the held-out rows pick the best of them (or the closed form)
MLP_RATE = 1e-2  # Adam's step size, relative to each tensor's RMS (the same relative move at any model scale)
HOLD_OUT = 4  # every 4th calibration row (by its index in the whole calibration set) is held out for stopping


@dataclass(frozen=True)
class Refit:
    """One cut MLP's re-fitted weights, kept channels only, in the model dtype (on the CPU): `down`, down_proj's
    kept columns [D, K]; `gate` and `up`, the kept rows of gate_proj and up_proj [K, D] (the two halves of a
    fused gate_up_proj), or None where the re-fit leaves them as they are (every re-fit but `mlp`)."""

    down: torch.Tensor
    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None


def apply_refits(model: nn.Module, kept_channels: dict[str, list[int]], refits: dict[str, Refit]) -> None:
    """Write the re-fitted kept columns into every down_proj (and the kept rows of gate/up, where re-fitted) in
    place (before slicing; the dropped channels are left as they are, slicing removes them)."""
    family = models.family_of(model.config)
    for name, mlp in models.mlps(model).items():
        if name in refits:
            refit, weight = refits[name], mlp.down_proj.weight
            kept = torch.as_tensor(kept_channels[name], dtype=torch.long, device=weight.device)
            weight.data[:, kept] = refit.down.to(weight)
            for projection, tensor in rows_replaced(family, refit, kept, mlp.down_proj.in_features).items():
                rows = family.channel_rows(kept, mlp.down_proj.in_features)[projection]
                target = getattr(mlp, projection).weight
                target.data[rows] = tensor.to(target)


def check_refits(model: nn.Module, kept_channels: dict[str, list[int]], refits: dict[str, Refit]) -> None:
    """ValueError unless every re-fit belongs to an MLP of `model` and has the shapes of its kept channels."""
    mlps = models.mlps(model)
    for name, refit in refits.items():
        if name not in mlps or name not in kept_channels:
            raise ValueError(f"a re-fit names {name!r}, which is not a cut MLP of this model")
        hidden, kept = mlps[name].down_proj.out_features, len(kept_channels[name])
        shapes = {"down": (hidden, kept), "gate": (kept, hidden), "up": (kept, hidden)}
        for part, shape in shapes.items():
            tensor = getattr(refit, part)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name}'s re-fitted {part} is {tuple(tensor.shape)}, not {shape}")


def rows_replaced(family: models.Family, refit: Refit, kept: torch.Tensor, intermediate: int) -> dict:
    """{projection: its kept rows as re-fitted} (empty when gate/up are not re-fitted): gate_proj and up_proj, or
    a fused gate_up_proj's rows (gate half first), in the order `family.channel_rows` lists them."""
    if refit.gate is None:
        return {}
    if family.fused_gate_up:
        return {"gate_up_proj": torch.cat([refit.gate, refit.up])}
    return {"gate_proj": refit.gate, "up_proj": refit.up}


def kept_gate_up(family: models.Family, mlp: nn.Module, kept: torch.Tensor) -> tuple:
    """(gate rows [K, D], up rows [K, D], gate bias [K] or None, up bias [K] or None) of the kept channels."""
    gate, up = (w.detach()[kept] for w in family.gate_up_weights(mlp))
    if family.fused_gate_up:
        bias = mlp.gate_up_proj.bias
        biases = (None, None) if bias is None else (b.detach()[kept] for b in bias.chunk(2))
    else:
        biases = (None if p.bias is None else p.bias.detach()[kept] for p in (mlp.gate_proj, mlp.up_proj))
    return (gate, up, *biases)


@dataclass
class Samples:
    """One layer's rows for `reconstruct` (this rank's share): per batch the MLP's inputs x [n, D], the targets
    r [n, D] of its output and the token weights w [n], float32, split into `train` and `held` (held-out rows)."""

    train: list = field(default_factory=list)
    held: list = field(default_factory=list)

    def add(self, x: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, held: torch.Tensor) -> None:
        """A batch's [B, L, D] inputs and targets, [B, L] weights (None: all 1) and [B] held-out flags."""
        rows, length = x.shape[:2]
        w = torch.ones(rows, length, dtype=torch.float32, device=x.device) if weights is None else weights.float()
        for part, pick in ((self.train, ~held), (self.held, held)):
            if bool(pick.any()):
                part.append((x[pick].reshape(-1, x.shape[-1]).float(), target[pick].reshape(-1, x.shape[-1]).float(),
                             w[pick].reshape(-1)))


def reconstruct(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, samples: Samples, *, activation: str,
                original: torch.Tensor, biases: tuple = (None, None), ridge: float = RIDGE, group=None,
                steps: int | None = None, rate: float | None = None,
                name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The pruned MLP x -> down (act(gate x + b_g) * (up x + b_u)) fitted to the targets r of `samples`: (gate,
    up, down) float32, or None when the closed form `down` (fitted on every row, held-out ones included) stands.

    The loss is sum_t w_t ||r_t - MLP(x_t)||^2 over the training rows + the closed form's ridge on down
    (damp ||down - W_K||^2, damp = `ridge` x mean diag of the training rows' Gram, `original`: W_K), both per
    unit of token weight. It starts at the closed form on the training rows (`refit_to`; the gradient then moves
    gate and up first), takes `steps` full-batch Adam steps on float32 master copies of all three, and keeps the
    step with the least held-out loss if it beats the start's: both fitted on the same rows, so the held-out
    rows judge them alike (the closed form `down` saw the held-out rows, and would look better on them than it
    is). At the step kept, down is re-solved in closed form on every row, as the closed form is. Over every
    rank of `group` the sums (Gram, cross term, gradients, losses) are all-reduced, so every rank takes the
    same steps. Deterministic: full-batch gradients, nothing random."""
    steps, rate = MLP_STEPS if steps is None else steps, MLP_RATE if rate is None else rate
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    reduce = (lambda t: t) if group is None else (lambda t: (group.all_reduce(t), t)[1])
    with torch.inference_mode(False), torch.enable_grad():
        params = [t.detach().float().clone().requires_grad_() for t in (gate, up, down)]
        fixed = [None if b is None else b.detach().float().clone() for b in biases]
        data = [[], []]  # the rows as tensors autograd may save (`samples` holds inference tensors), moved out
        for part, copies in zip((samples.train, samples.held), data):
            while part:
                copies.append(tuple(t.clone() for t in part.pop(0)))
        device = params[0].device
        totals = reduce(torch.tensor([sum(float(w.double().sum()) for _, _, w in part) for part in data],
                                     dtype=torch.float64, device=device))
        if float(totals.min()) <= 0:
            return None

        def hidden(x):
            return act(F.linear(x, params[0], fixed[0])) * F.linear(x, params[1], fixed[1])

        def loss(x, r, w):
            return (F.linear(hidden(x), params[2]) - r).square().sum(-1) * w

        def held_out() -> float:
            with torch.no_grad():
                total = torch.zeros(1, dtype=torch.float64, device=device)
                for x, r, w in data[1]:
                    total += loss(x, r, w).double().sum()
            return float(reduce(total)) / float(totals[1])

        def closed_form(parts) -> float:
            """down set to the closed form on the rows of `parts` at the present gate/up; its damp."""
            kept_rows = down.shape[1]
            gram = torch.zeros(kept_rows, kept_rows, dtype=torch.float64, device=device)
            cross = torch.zeros(down.shape[0], kept_rows, dtype=torch.float64, device=device)
            with torch.no_grad():
                for x, r, w in (batch for part in parts for batch in part):
                    h = hidden(x)
                    weighted = h * w.reshape(-1, 1)
                    gram.add_(weighted.T @ h)  # float32 products summed in float64, as the closed form's
                    cross.add_(r.T @ weighted)
                reduce(gram), reduce(cross)
                index = torch.arange(kept_rows, device=device)
                params[2].copy_(refit_to(original.float(), cross, gram, index, ridge).float())
            return ridge * float(gram.diagonal().mean())

        damp = closed_form(data[:1]) / float(totals[0])
        anchor = original.detach().float().clone()
        rates = [rate * float(p.detach().square().mean().sqrt()) for p in params]
        adam = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, rates)], foreach=False)
        best, kept, chosen = None, None, 0
        for step in range(steps + 1):
            if step:
                sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
                for x, r, w in data[0]:  # each batch's float32 gradient, summed in float64 (as the statistics
                    # are: ranks add the same per-batch terms in another order, ~1e-16 apart, not 1e-7)
                    for total, grad in zip(sums, torch.autograd.grad(loss(x, r, w).sum(), params)):
                        total.add_(grad)
                for p, total in zip(params, sums):
                    p.grad = (reduce(total) / float(totals[0])).float()
                params[2].grad.add_(params[2].detach() - anchor, alpha=2 * damp)  # (after the sum: once)
                adam.step()
            now = held_out()
            if step == 0:
                start = best = now
            elif now < best:
                best, chosen, kept = now, step, [p.detach().clone() for p in params]
        log.debug("%s: held-out loss %.6g (closed form) -> %.6g (step %d of %d)", name, start, best, chosen, steps)
        if kept is None:
            return None
        for p, value in zip(params, kept):
            p.data.copy_(value)
        closed_form(data)  # down re-solved on every row at the chosen gate/up, as the closed form uses every row
        return tuple(p.detach().clone() for p in params)


def refit(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """W_K + W_D G[D, K] (G[K, K] + r I)^-1 in float64: the columns K that best stand in for all of W on the
    data (the least-squares fit; the ridge damps only the correction, so W_K stays where the data says little)."""
    dropped = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    dropped[kept] = False
    g_kk = gram[kept][:, kept].double()
    g_kk = g_kk + ridge * g_kk.diagonal().mean() * torch.eye(len(kept), dtype=torch.float64, device=g_kk.device)
    rhs = weight[:, dropped].double() @ gram[dropped][:, kept].double()  # W_D G_DK  [D_out, K]
    return weight[:, kept].double() + torch.linalg.solve(g_kk, rhs.T).T  # G_KK symmetric: rhs G_KK^-1


def refit_to(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor,
             ridge: float = RIDGE) -> torch.Tensor:
    """(C_K + r W_K) (G_KK + r I)^-1 in float64: the columns K that best map the activations h (Gram G) to the
    targets (cross term C = sum_t w_t r_t h_t^T), damped towards the original columns W_K as `refit` is. With
    C = W G this is `refit`; the sequential re-fit's G and C come from the pruned model's activations."""
    g_kk = gram[kept][:, kept].double()
    damp = ridge * g_kk.diagonal().mean()
    eye = torch.eye(len(kept), dtype=torch.float64, device=g_kk.device)
    rhs = cross[:, kept].double() + damp * weight[:, kept].double()
    return torch.linalg.solve(g_kk + damp * eye, rhs.T).T


def eliminate(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, keep: int, ridge: float = RIDGE,
              steps: int = 32) -> list[int]:
    """The `keep` channels to keep for the re-fit, by greedy backward elimination (Optimal Brain Surgeon on the
    re-fit's objective, as OSSCAR and SlimGPT select): starting from the fit on all channels, drop the channels
    whose removal, with the others re-fitted, raises sum_t w_t ||r_t - W' h_t||^2 least, in about `steps`
    groups (1 channel per group when `steps` >= I - keep). The objective's Hessian is G + r I (ridge as in
    `refit_to`): dropping j alone costs ||W'_j||^2 / [H^-1]_jj, and a group S is dropped jointly, the rest
    re-fitted by W' -= W'_S [H^-1]_SS^-1 [H^-1]_S: 2 (I - K) I (I + D) FLOP in float64 in all, as products of
    rank `group`, plus the I^3 of the first inverse."""
    size = gram.shape[0]
    g = gram.double()
    damp = ridge * g.diagonal().mean()
    inverse = torch.linalg.inv(g + damp * torch.eye(size, dtype=torch.float64, device=g.device))
    fitted = (cross.double() + damp * weight.double()) @ inverse
    alive = torch.ones(size, dtype=torch.bool, device=g.device)
    group = max(1, -(-(size - keep) // steps))
    while int(alive.sum()) > keep:
        cost = fitted.square().sum(0) / inverse.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
        cost[~alive] = float("inf")
        drop = torch.topk(cost, min(group, int(alive.sum()) - keep), largest=False).indices
        pivot = inverse[drop][:, drop]
        fitted -= torch.linalg.solve(pivot, fitted[:, drop].T).T @ inverse[drop]
        inverse -= inverse[:, drop] @ torch.linalg.solve(pivot, inverse[drop])
        alive[drop] = False
    return alive.nonzero().flatten().tolist()


def error_left(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float = RIDGE) -> float:
    """The share of the output error of dropping the other channels that the re-fit leaves:
    sum_t ||W h_t - W' h_{t,K}||^2 / sum_t ||W_D h_{t,D}||^2 from the Gram alone (1.0 when nothing is dropped).

    With B = W_D G_DK and A = G_KK + r I = L L^T (the matrix `refit` solves), the correction is B A^-1 and the
    error left is before - tr(B A^-1 B^T) - r ||B A^-1||^2 (as G_KK = A - r I): one Cholesky factor and two
    triangular solves, in float64, without forming the re-fitted columns."""
    weight, gram = weight.double(), gram.double()
    dropped = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    dropped[kept] = False
    w_d, g_kk = weight[:, dropped], gram[kept][:, kept]
    before = float(((w_d @ gram[dropped][:, dropped]) * w_d).sum()) if dropped.any() else 0.0
    damp = ridge * g_kk.diagonal().mean()
    if not before > 0 or not damp > 0:  # nothing dropped, or kept channels that never fire: nothing to re-fit
        return 1.0
    factor = torch.linalg.cholesky(g_kk + damp * torch.eye(len(kept), dtype=torch.float64, device=g_kk.device))
    x = torch.linalg.solve_triangular(factor, (w_d @ gram[dropped][:, kept]).T, upper=False)  # L^-1 B^T
    y = torch.linalg.solve_triangular(factor.T, x, upper=True)  # A^-1 B^T
    return (before - float(x.square().sum()) - float(damp) * float(y.square().sum())) / before
