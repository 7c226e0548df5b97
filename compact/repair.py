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
"""
from __future__ import annotations

import torch
from torch import nn

from . import models

RIDGE = 0.3  # SmolLM2-135M, FFN 960 of 1536 channels, 16 x 512: sequential 1e-2 +0.155, 0.1 +0.137, 0.3 +0.130,
# 1.0 +0.131 bits/byte; same-input 1e-2 +0.149, 0.1 +0.145, 0.3 +0.148 (bench/results/refit_research.csv)


def apply_refits(model: nn.Module, kept_channels: dict[str, list[int]], refits: dict[str, torch.Tensor]) -> None:
    """Write the re-fitted kept columns into every down_proj in place (before slicing; the dropped columns are
    left as they are, slicing removes them)."""
    for name, mlp in models.mlps(model).items():
        if name in refits:
            weight = mlp.down_proj.weight
            kept = torch.as_tensor(kept_channels[name], dtype=torch.long, device=weight.device)
            weight.data[:, kept] = refits[name].to(weight)


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
    sum_t ||W h_t - W' h_{t,K}||^2 / sum_t ||W_D h_{t,D}||^2 from the Gram alone (1.0 when nothing is dropped)."""
    weight, gram = weight.double(), gram.double()
    dropped = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    dropped[kept] = False
    if not dropped.any():
        return 1.0
    w_d, g_dd, g_dk = weight[:, dropped], gram[dropped][:, dropped], gram[dropped][:, kept]
    before = float(((w_d @ g_dd) * w_d).sum())
    delta = refit(weight, gram, kept, ridge) - weight[:, kept]  # the correction W_D G_DK (G_KK + r I)^-1
    after = before - 2 * float(((delta @ g_dk.T) * w_d).sum()) + float(((delta @ gram[kept][:, kept]) * delta).sum())
    return after / before if before > 0 else 1.0
