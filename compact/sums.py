"""The float64 sums a scoring pass accumulates, as one object: what a resume checkpoint saves and restores
and what torchrun's ranks add together (compact.runs)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class Sums:
    """Per MLP name: common act^2 `scores` [I], optional unweighted act^2 `plain` [I], optional weighted Gram
    `grams` [I, I] of down_proj's input (allocated on a layer's first batch; the engine pops each layer's when
    done); and `mass`, the sum of the token weights seen. All float64, on `device`."""

    def __init__(self, names, size: int, device, *, plain: bool = False, gram: bool = False):
        self.scores = {name: torch.zeros(size, dtype=torch.float64, device=device) for name in names}
        self.plain = {name: torch.zeros_like(s) for name, s in self.scores.items()} if plain else None
        self.grams: dict[str, torch.Tensor] | None = {} if gram else None
        self.mass = torch.zeros((), dtype=torch.float64, device=device)

    def add_gram(self, name: str, h: torch.Tensor, weights: torch.Tensor | None) -> None:
        """grams[name] += h^T diag(w) h for one batch (float32 products, float64 across batches); a no-op
        without grams."""
        if self.grams is None:
            return
        h2 = h.detach().reshape(-1, h.shape[-1]).float()
        weighted = h2 if weights is None else h2 * weights.reshape(-1, 1).float()
        if name not in self.grams:
            self.grams[name] = torch.zeros(h2.shape[1], h2.shape[1], dtype=torch.float64, device=h2.device)
        self.grams[name].add_(weighted.T @ h2)  # float32 product, added into float64 without a float64 copy

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{"scores/<mlp>", "plain/<mlp>", "gram/<mlp>", "mass": tensor}: the live tensors, in a fixed order."""
        state = {f"scores/{k}": v for k, v in self.scores.items()}
        state.update({f"plain/{k}": v for k, v in (self.plain or {}).items()})
        state.update({f"gram/{k}": v for k, v in (self.grams or {}).items()})
        state["mass"] = self.mass
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the sums `state_dict` gave (KeyError when one is missing); Gram matrices not yet allocated here
        are taken over."""
        with torch.no_grad():
            for key, value in self.state_dict().items():
                value.copy_(state[key])
            for key, value in state.items():
                if self.grams is not None and key.startswith("gram/") and key[5:] not in self.grams:
                    self.grams[key[5:]] = value.to(self.mass.device, torch.float64)

    def all_reduce(self) -> None:
        """Every sum replaced by its total over the torch.distributed process group (every rank must hold the
        same sums: the same MLPs and Gram matrices)."""
        for value in self.state_dict().values():
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
