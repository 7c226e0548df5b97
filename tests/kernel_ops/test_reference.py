"""The reference itself against naive per-element formulas, and the backend dispatch."""
import math

import pytest
import torch

import compact_kernels as ck
from compact_kernels import reference as ref


def test_channel_scores_naive():
    h = torch.randn(2, 3, 4, dtype=torch.float64).float()
    w = torch.rand(2, 3)
    expected = [sum(float(w[i, j]) * float(h[i, j, c]) ** 2 for i in range(2) for j in range(3)) for c in range(4)]
    assert torch.allclose(ref.channel_scores(h, w).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    unweighted = [sum(float(h[i, j, c]) ** 2 for i in range(2) for j in range(3)) for c in range(4)]
    assert torch.allclose(ref.channel_scores(h).double(), torch.tensor(unweighted, dtype=torch.float64), rtol=1e-6)
    out = torch.ones(4, dtype=torch.float64)
    assert ref.channel_scores(h, w, out=out) is out
    assert torch.allclose(out, 1 + torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_scores_steps_into_buffers(dtype):
    """squares into a buffer (or in place) then weighted_sum: bit for bit channel_scores, as a buffer path uses them."""
    h, w = torch.randn(6, 7, 33).to(dtype), torch.rand(6, 7)
    want = ref.channel_scores(h, w, out=torch.zeros(33, dtype=torch.float64))
    buffer = h.reshape(-1, 33).clone() if dtype == torch.float32 else torch.empty(42, 33)
    sq = ref.squares(buffer if dtype == torch.float32 else h, out=buffer)
    assert sq.data_ptr() == buffer.data_ptr()
    assert torch.equal(ref.weighted_sum(sq, w, out=torch.zeros(33, dtype=torch.float64)), want)
    assert torch.equal(ref.weighted_sum(sq), ref.channel_scores(h))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_naive(act):
    g, u = torch.randn(3, 5), torch.randn(3, 5)

    def f(x):
        if act == "silu":
            return x / (1 + math.exp(-x))
        return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    expected = torch.tensor([[f(float(g[i, c])) * float(u[i, c]) for c in range(5)] for i in range(3)])
    scores = torch.zeros(5, dtype=torch.float64)
    h = ref.glu_and_score(g, u, activation=act, scores=scores)
    assert torch.allclose(h, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(scores, (expected.double() ** 2).sum(0), rtol=1e-5)
    assert torch.equal(ref.glu_and_score(torch.cat([g, u], -1), activation=act), h)


def test_token_weights_and_gathers_naive():
    ids = torch.tensor([[3, 0, 2], [1, 1, 3]])
    table = torch.tensor([0.5, 1.0, 0.0, 2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    expected = [[float(table[ids[i, j]]) * float(mask[i, j]) for j in range(3)] for i in range(2)]
    assert torch.equal(ref.token_weights(ids, table, mask), torch.tensor(expected))
    w = torch.arange(12.0).reshape(3, 4)
    assert ref.gather_rows(w, torch.tensor([2, 0])).tolist() == [[8, 9, 10, 11], [0, 1, 2, 3]]
    assert ref.gather_cols(w, torch.tensor([3, 1], dtype=torch.int32)).tolist() == [[3, 1], [7, 5], [11, 9]]


def test_backend_dispatch(monkeypatch):
    x = torch.randn(3, 4)
    monkeypatch.setenv("COMPACT_KERNELS_BACKEND", "torch")
    assert ck.backend_for(x) == "torch"
    monkeypatch.setenv("COMPACT_KERNELS_BACKEND", "auto")
    assert ck.backend_for(x) == ("triton" if x.is_cuda else "torch")
    monkeypatch.setenv("COMPACT_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ck.backend_for(x) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert ck.backend_for(x) == "torch"
    monkeypatch.setenv("COMPACT_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="COMPACT_KERNELS_BACKEND must be one of"):
        ck.backend_for(x)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_public_ops_agree_on_both_backends(monkeypatch, backend, device):
    """On a GPU the tensors live there (the interpreter flag only matters for CPU tensors)."""
    monkeypatch.setenv("COMPACT_KERNELS_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g, u = torch.randn(2, 9, 70, device=device), torch.randn(2, 9, 70, device=device)
    w = ck.token_weights(torch.randint(0, 10, (2, 9), device=device), torch.rand(10, device=device))
    s = torch.zeros(70, dtype=torch.float64, device=device)
    h = ck.glu_and_score(g, u, weights=w, scores=s)
    assert torch.allclose(s, ck.channel_scores(h, w).double(), rtol=1e-5)
    idx = torch.tensor([5, 1, 69], device=device)
    assert torch.equal(ck.gather_cols(h[0], idx), h[0][:, idx])
    assert torch.equal(ck.gather_rows(h[1], idx[:2]), h[1][idx[:2]])
