"""token_weights through Triton against the plain lookup."""
import pytest
import torch

from compact_kernels import weights as tw


@pytest.mark.parametrize("shape", [(1,), (3, 17), (2, 5, 1029)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("mask_dtype", [None, torch.int64, torch.bool, torch.float32], ids=str)
def test_token_weights_lookup(shape, index_dtype, mask_dtype, device):
    gen = torch.Generator().manual_seed(len(shape))
    table = torch.rand(300, generator=gen, dtype=torch.float64).to(device)
    ids = torch.randint(0, 300, shape, generator=gen).to(device=device, dtype=index_dtype)
    mask = None if mask_dtype is None else (torch.rand(shape, generator=gen) > 0.5).to(device=device, dtype=mask_dtype)
    got = tw.token_weights(ids, table, mask)
    expected = table.float()[ids.long()] * (1 if mask is None else mask.float())
    assert got.dtype == torch.float32 and got.shape == ids.shape
    assert torch.equal(got, expected)


def test_token_weights_strided_and_empty(device):
    ids = torch.arange(40, device=device).reshape(5, 8).t()[:, ::2]
    table = torch.linspace(0, 1, 40, device=device)
    assert torch.equal(tw.token_weights(ids, table), table[ids])
    assert tw.token_weights(torch.empty(0, 3, dtype=torch.int64, device=device), table).shape == (0, 3)
