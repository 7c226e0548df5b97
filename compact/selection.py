"""Selection: which FFN channels to keep, from the scores (same K in every layer, as the paper does)."""
from __future__ import annotations

import torch


def parse_ffn_keep(value: float | int | str) -> int | float:
    """`--ffn-keep` as a channel count (an int, "128", "1ch") or a ratio in (0, 1] (a float, "0.5", "1.0").
    A bare "1" is refused: one channel and all channels are both plausible readings."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    count = text[:-2] if text.lower().endswith("ch") else text
    if count.lstrip("+") == "1" and count is text:
        raise ValueError("--ffn-keep 1 is ambiguous: write 1ch to keep one channel per layer, or 1.0 to keep all")
    if count.lstrip("+").isdigit():
        return int(count)
    try:
        if count is text:
            return float(text)
    except ValueError:
        pass
    raise ValueError(f"--ffn-keep must be a channel count (128, 1ch) or a ratio in (0, 1] (0.5, 1.0), got {value!r}")


def resolve_ffn_keep(value: float | int | str, intermediate: int, multiple: int = 64) -> int:
    """K from `--ffn-keep` (see parse_ffn_keep): a count, or a ratio rounded to a multiple of `multiple`."""
    number = parse_ffn_keep(value)
    if multiple < 1:
        raise ValueError(f"--ffn-multiple must be at least 1, got {multiple}")
    if isinstance(number, float):
        if not 0 < number <= 1:
            raise ValueError(f"--ffn-keep ratio must be in (0, 1], got {value}")
        if number < 1 and multiple >= intermediate:
            raise ValueError(f"--ffn-keep {value} cannot be rounded to a multiple of --ffn-multiple {multiple} in an "
                             f"FFN of {intermediate} channels (it would keep them all): lower --ffn-multiple or "
                             "give a count")
        number = min(intermediate, max(multiple, round(number * intermediate / multiple) * multiple))
    if not 1 <= number <= intermediate:
        raise ValueError(f"--ffn-keep must be between 1 and the intermediate size {intermediate}, got {number}")
    return number


def top_channels(scores: torch.Tensor, keep: int) -> list[int]:
    """The `keep` highest-scoring channels, ties to the lower index, in ascending order."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} channels")
    order = torch.sort(scores.detach().cpu().double(), descending=True, stable=True).indices
    return sorted(order[:keep].tolist())


def select_channels(scores: dict[str, torch.Tensor], keep: int) -> dict[str, list[int]]:
    """{mlp name: ascending kept channels}, the same count in every layer."""
    return {name: top_channels(s, keep) for name, s in scores.items()}
