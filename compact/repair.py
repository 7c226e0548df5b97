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

RIDGE = 1e-2  # SmolLM2-135M at 65%: 1e-4 +0.208, 1e-2 +0.204, 1e-1 +0.198 (16 x 512); 1e-2 +0.179 (64 x 512)


def repair_down_proj(model: nn.Module, grams: dict[str, torch.Tensor], kept_channels: dict[str, list[int]],
                     ridge: float = RIDGE) -> None:
    """Re-fit the kept columns of every down_proj in place (before slicing); the dropped ones are left as they
    are (slicing removes them)."""
    for name, mlp in models.mlps(model).items():
        weight = mlp.down_proj.weight
        kept = torch.as_tensor(kept_channels[name], dtype=torch.long, device=weight.device)
        weight.data[:, kept] = refit(weight.data, grams[name].to(weight.device), kept, ridge).to(weight.dtype)


def refit(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """W_K + W_D G[D, K] (G[K, K] + r I)^-1 in float64: the columns K that best stand in for all of W on the
    data (the least-squares fit; the ridge damps only the correction, so W_K stays where the data says little)."""
    dropped = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    dropped[kept] = False
    g_kk = gram[kept][:, kept].double()
    g_kk = g_kk + ridge * g_kk.diagonal().mean() * torch.eye(len(kept), dtype=torch.float64, device=g_kk.device)
    rhs = weight[:, dropped].double() @ gram[dropped][:, kept].double()  # W_D G_DK  [D_out, K]
    return weight[:, kept].double() + torch.linalg.solve(g_kk, rhs.T).T  # G_KK symmetric: rhs G_KK^-1


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
