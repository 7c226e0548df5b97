"""Bad input gets a clear Python exception naming the argument, in both backends, before any launch."""
import pytest
import torch

import compact_kernels.reference as ref
from compact_kernels import gather as tg, scores as ts, weights as tw

BACKENDS = {"triton": (ts, ts, tw, tg), "torch": (ref, ref, ref, ref)}


@pytest.fixture(params=sorted(BACKENDS))
def ops(request):
    s, g, w, gt = BACKENDS[request.param]
    return {"channel_scores": s.channel_scores, "glu_and_score": g.glu_and_score,
            "token_weights": w.token_weights, "gather_rows": gt.gather_rows, "gather_cols": gt.gather_cols}


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.float64])
def test_non_float_activations(ops, dtype):
    with pytest.raises(TypeError, match="h must be float32, bfloat16 or float16"):
        ops["channel_scores"](torch.zeros(4, 3, dtype=dtype))
    with pytest.raises(TypeError, match="gate"):
        ops["glu_and_score"](torch.zeros(4, 6, dtype=dtype))


def test_shape_and_dtype_errors(ops):
    h = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match=r"weights must have shape \(4, 5\)"):
        ops["channel_scores"](h, torch.ones(4, 3))
    with pytest.raises(ValueError, match=r"out must have shape \(3,\)"):
        ops["channel_scores"](h, out=torch.zeros(4))
    with pytest.raises(TypeError, match="out must be float32 or float64"):
        ops["channel_scores"](h, out=torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="activation must be one of silu, gelu_tanh"):
        ops["glu_and_score"](h, h, activation="relu")
    with pytest.raises(ValueError, match="up must have the shape"):
        ops["glu_and_score"](h, h[..., :2])
    with pytest.raises(TypeError, match="up must have the dtype"):
        ops["glu_and_score"](h, h.half())
    with pytest.raises(ValueError, match="even last dimension"):
        ops["glu_and_score"](h)
    with pytest.raises(ValueError, match=r"scores must have shape \(3,\)"):
        ops["glu_and_score"](h, h, scores=torch.zeros(6))
    with pytest.raises(TypeError, match="h must be a torch.Tensor"):
        ops["channel_scores"]([[1.0]])


@pytest.mark.parametrize("name", ["gather_rows", "gather_cols"])
@pytest.mark.parametrize("bad", [7, -1, 100])
def test_gather_index_out_of_range(ops, name, bad):
    w = torch.randn(7, 7)
    with pytest.raises(IndexError, match=f"index holds {bad}, outside \\[0, 7\\)"):
        ops[name](w, torch.tensor([0, bad, 3]))


def test_gather_argument_errors(ops):
    w = torch.randn(5, 4)
    with pytest.raises(TypeError, match="index must be int32 or int64"):
        ops["gather_rows"](w, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="index must be 1-D"):
        ops["gather_rows"](w, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops["gather_cols"](torch.randn(5), torch.tensor([0]))
    with pytest.raises(TypeError, match="weight must be a float tensor"):
        ops["gather_rows"](torch.ones(5, 4, dtype=torch.int64), torch.tensor([0]))


def test_token_weights_errors(ops):
    ids, table = torch.tensor([[0, 4]]), torch.ones(5)
    with pytest.raises(IndexError, match=r"input_ids holds 5, outside \[0, 5\)"):
        ops["token_weights"](torch.tensor([[5]]), table)
    with pytest.raises(TypeError, match="input_ids must be int32 or int64"):
        ops["token_weights"](ids.float(), table)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        ops["token_weights"](ids, table, torch.ones(2, 2))
    with pytest.raises(ValueError, match="table must be a 1-D real tensor"):
        ops["token_weights"](ids, torch.ones(5, 1))
