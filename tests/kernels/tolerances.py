"""Per-dtype tolerances and a comparison whose failure says where and by how much."""
import torch

RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float = 0.0, what: str) -> None:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        i = int((err - rtol * expected.abs()).flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), actual.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off; worst at {idx}: "
            f"got {actual[idx].item():.9g}, expected {expected[idx].item():.9g} "
            f"(|diff| {err[idx].item():.3g} > atol {atol:.3g} + rtol {rtol:g} * |expected|)")


def score_atol(rows: int) -> float:
    """Absolute slack for a sum of `rows` fp32 terms of order one (near-zero sums have no relative scale)."""
    return 1e-6 * max(rows, 1)
