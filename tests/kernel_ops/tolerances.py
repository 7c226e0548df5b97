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


# float32 unit roundoff: every float32 operation is exact up to a relative 2^-24.
FP32_U = 2.0 ** -24


def fp32_sum_rtol(terms: int) -> float:
    """Relative bound for a float32 sum of `terms` non-negative products w * h^2 (any order or blocking):
    (terms - 1) u for the additions (Higham, Accuracy and Stability of Numerical Algorithms, eq. 4.4) plus
    2u for the square and the weight."""
    return (max(terms, 1) + 2) * FP32_U


def fp32_forward_rtol(depth: int, width: int, evaluations: int = 2) -> float:
    """Relative bound, against the compared tensor's scale, between float32 forward passes that may round
    differently (BLAS blocking, thread count, batch shape, op order) or against an exact one.

    Each of `depth` chained reductions (dot products, norms, softmax sums) of at most `width` terms is exact up
    to gamma_width ~ width * u relative to the sum of |terms| (Higham, Thm 3.5); to first order the errors of a
    chain add; `evaluations` roundings are compared (2: two float32 runs, each off the exact value); a squared
    activation doubles a relative error (the leading 2, harmless for logits). Because the bound is relative to
    the sum of |terms|, compare with atol = rtol * max|expected|: cancellation can leave a value small while
    its error stays at the scale of its terms.
    """
    return 2 * evaluations * depth * width * FP32_U


def decoder_rtol(config, seq_len: int, evaluations: int = 2) -> float:
    """fp32_forward_rtol for a decoder-only transformer: 9 chained reductions per layer (input norm, q/k/v,
    q.k, softmax, attention x v, o_proj, post-attention norm, gate/up, down_proj) plus the final norm and the
    LM head; width = the longest of hidden size, FFN size and sequence."""
    width = max(config.hidden_size, config.intermediate_size, seq_len)
    return fp32_forward_rtol(9 * config.num_hidden_layers + 2, width, evaluations)
