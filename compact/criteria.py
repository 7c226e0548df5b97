"""FFN channel criteria, for comparison at equal budget (the names: compact.options.CRITERIA). The data-driven
ones come from the engine's one scoring pass."""
from __future__ import annotations

import torch

from . import models

def _channel_weight_norms(mlp, family) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2 norms of the down_proj columns, squared L2 norms of the gate and up rows) per channel, float64."""
    down = mlp.down_proj.weight.detach().double()
    gate, up = (w.detach().double() for w in family.gate_up_weights(mlp))
    return down.norm(dim=0), gate.square().sum(1) + up.square().sum(1)


def data_free_scores(model, criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """magnitude or random scores per MLP."""
    family = models.family_of(model.config)
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for name, mlp in models.mlps(model).items():
        if criterion == "random":
            scores[name] = torch.rand(mlp.down_proj.in_features, generator=gen, dtype=torch.float64)
        else:
            down, gate_up = _channel_weight_norms(mlp, family)
            scores[name] = (down.square() + gate_up).sqrt().cpu()
    return scores


def _wanda(mlp, plain: torch.Tensor) -> torch.Tensor:
    """||W_down[:, c]||_1 * ||h_c||_2 per channel."""
    return mlp.down_proj.weight.detach().double().norm(p=1, dim=0) * plain.to(mlp.down_proj.weight.device).sqrt()


def layer_scores(stats, criterion: str) -> torch.Tensor:
    """One layer's data-driven criterion from the engine's statistics (compact.engine.LayerStats)."""
    if criterion == "common-act2":
        return stats.scores
    if criterion == "act2":
        return stats.plain
    return _wanda(stats.mlp, stats.plain)

