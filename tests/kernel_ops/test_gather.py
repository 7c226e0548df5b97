"""gather_rows / gather_cols through Triton: bit-exact copies for every dtype, index type and layout."""
import pytest
import torch

from compact_kernels import gather as tg

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def bits(x):
    """Compare raw bits so -0.0 and NaN payloads count too."""
    return x.contiguous().view(torch.uint8) if x.numel() else x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("rows,cols,n", [(1, 1, 1), (13, 257, 5), (300, 17, 299), (1041, 131, 64)])
def test_gathers_are_exact(dtype, index_dtype, rows, cols, n, device):
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    w = torch.randn(rows, cols, generator=gen).to(dtype=dtype, device=device)
    w[0, 0] = -0.0
    r_idx = torch.randint(0, rows, (n,), generator=gen).to(device=device, dtype=index_dtype)
    c_idx = torch.randint(0, cols, (n,), generator=gen).to(device=device, dtype=index_dtype)
    got_r, got_c = tg.gather_rows(w, r_idx), tg.gather_cols(w, c_idx)
    assert got_r.dtype == dtype and got_r.is_contiguous() and got_c.is_contiguous()
    assert torch.equal(bits(got_r), bits(w[r_idx.long()])), "gather_rows differs from weight[index]"
    assert torch.equal(bits(got_c), bits(w[:, c_idx.long()])), "gather_cols differs from weight[:, index]"


def test_gathers_on_strided_weights(device):
    base = torch.randn(64, 90, dtype=torch.bfloat16, device=device)
    for w in (base.t(), base[::3, 1::2], base[:, :37]):
        i0 = torch.arange(w.shape[0] - 1, -1, -2, device=device)
        i1 = torch.tensor([w.shape[1] - 1, 0, 0, 2], device=device)
        assert torch.equal(tg.gather_rows(w, i0), w[i0])
        assert torch.equal(tg.gather_cols(w, i1), w[:, i1])


def test_gathers_empty(device):
    w = torch.randn(5, 4, device=device)
    none = torch.empty(0, dtype=torch.int64, device=device)
    assert tg.gather_rows(w, none).shape == (0, 4)
    assert tg.gather_cols(w, none).shape == (5, 0)
    assert tg.gather_rows(torch.empty(3, 0, device=device), torch.tensor([2], device=device)).shape == (1, 0)


@pytest.mark.parametrize("name", sorted(tg.CONFIGS))
def test_every_launch_shape_the_sweep_tries_is_exact(name, device):
    """The launch shapes bench/bench_gather.py sweeps (a GPU run may make one of them the default) copy exactly,
    across block edges and on a strided weight."""
    config = tg.CONFIGS[name]
    w = torch.randn(40, config.block_d + 3, dtype=torch.bfloat16, device=device)
    rows = torch.arange(w.shape[0] - 1, -1, -3, device=device)
    cols = torch.arange(0, w.shape[1], 2, device=device)
    assert torch.equal(tg.launch(w, rows, False, config), w[rows])
    assert torch.equal(tg.launch(w, cols, True, config), w[:, cols])
    assert torch.equal(tg.launch(w.t(), rows[:20], True, config), w.t()[:, rows[:20]])
