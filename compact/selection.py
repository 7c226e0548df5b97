"""Selection: which FFN channels to keep, from the scores (same K in every layer, as the paper does)."""
from __future__ import annotations

from .options import parse_keep


def resolve_ffn_keep(value: float | int | str, intermediate: int, multiple: int = 64) -> int:
    """K from `--ffn-keep` (see options.parse_keep): a count, or a ratio rounded to a multiple of `multiple`."""
    number = parse_keep(value, "--ffn-keep")
    if multiple < 1:
        raise ValueError(f"--ffn-multiple must be at least 1, got {multiple}")
    if isinstance(number, float):
        if not 0 < number <= 1:
            raise ValueError(f"--ffn-keep ratio must be in (0, 1], got {value}")
        if number < 1 and multiple >= intermediate:
            raise ValueError(f"--ffn-keep {value} cannot be rounded to a multiple of --ffn-multiple {multiple} in an "
                             f"FFN of {intermediate} channels (it would keep them all): lower --ffn-multiple or "
                             "give a count")
        ratio, number = number, min(intermediate, max(multiple, round(number * intermediate / multiple) * multiple))
        if ratio < 1 and number == intermediate:
            raise ValueError(f"--ffn-keep {value} rounds to all {intermediate} channels at --ffn-multiple {multiple}: "
                             "give a smaller ratio, a count, or 1.0 to keep them all")
    if not 1 <= number <= intermediate:
        raise ValueError(f"--ffn-keep must be between 1 and the intermediate size {intermediate}, got {number}")
    return number


def top_channels(scores: torch.Tensor, keep: int, name: str = "scores") -> list[int]:
    """The `keep` highest-scoring channels, ties to the lower index, in ascending order. Scores that cannot
    rank (not finite, or all equal when some are cut) are a ValueError naming `name`."""
    import torch

    if not 1 <= keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} channels")
    values = scores.detach().cpu().double()
    _check_rankable(values, keep, name)
    order = torch.sort(values, descending=True, stable=True).indices
    return sorted(order[:keep].tolist())


def _check_rankable(values: torch.Tensor, keep: int, name: str) -> None:
    bad = (~values.isfinite()).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name}: {len(bad)} channel score(s) are not finite (channel {bad[0]} scores "
                         f"{values[bad[0]].item()}); NaN or inf cannot rank channels")
    if keep < values.numel() and values.min() == values.max():
        value = values[0].item()
        why = (": the calibration gave no weight (are all its tokens outside the kept vocabulary?)" if value == 0
               else "")
        raise ValueError(f"{name}: all {values.numel()} channel scores are {value:g}, so they cannot rank "
                         f"channels{why}")


def select_channels(scores: dict[str, torch.Tensor], keep: int) -> dict[str, list[int]]:
    """{mlp name: ascending kept channels}, the same count in every layer."""
    return {name: top_channels(s, keep, name) for name, s in scores.items()}
