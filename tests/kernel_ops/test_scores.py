"""channel_scores and glu_and_score through Triton (interpreter on CPU) against a float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from compact_kernels import scores as tk
from .tolerances import RTOL, assert_close, score_atol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (leading dims, channels): ones, primes, 2^k + 17, channels not a multiple of the 128-wide tile.
SHAPES = [((1,), 1), ((1,), 7), ((17,), 1), ((31,), 129), ((2, 3), 257), ((3, 47), 1041), ((273,), 131)]


def f64_scores(h, w=None):
    sq = h.double().reshape(-1, h.shape[-1]) ** 2
    return sq.sum(0) if w is None else (sq * w.double().reshape(-1, 1)).sum(0)


def f64_glu(g, u, act):
    g64, u64 = g.double(), u.double()
    a = F.silu(g64) if act == "silu" else F.gelu(g64, approximate="tanh")
    return a * u64


def make(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_channel_scores_matches_f64(lead, C, dtype, weighted, device):
    h = make((*lead, C), dtype, device)
    w = torch.rand(lead, generator=torch.Generator().manual_seed(1)).to(device) if weighted else None
    rows = h.numel() // C
    # Inputs are exact in every dtype; only fp32 accumulation differs from float64.
    assert_close(tk.channel_scores(h, w), f64_scores(h, w), rtol=1e-5, atol=score_atol(rows),
                 what=f"channel_scores {tuple(h.shape)} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channel_scores_strided_inputs(dtype, device):
    base = make((6, 40, 300), dtype, device)
    cases = {
        "sliced rows": base[:, ::3, 5:266],
        "channel stride": base[1].t()[:, ::2],
        "three unmergeable dims": make((5, 7, 9, 150), dtype, device)[::2, 1::2, ::4, :131],
        "leading transpose": base.transpose(0, 1),
    }
    for name, h in cases.items():
        w = torch.rand(h.shape[:-1], generator=torch.Generator().manual_seed(2)).to(device).transpose(0, -1).contiguous().transpose(0, -1) \
            if h.dim() > 2 else torch.rand(h.shape[:-1]).to(device)
        rows = h.numel() // h.shape[-1]
        assert_close(tk.channel_scores(h, w), f64_scores(h, w), rtol=1e-5, atol=score_atol(rows),
                     what=f"channel_scores {name} {dtype}")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64], ids=str)
def test_channel_scores_out_accumulates_across_calls(out_dtype, device):
    batches = [make((2, 57, 203), torch.bfloat16, device, seed=s) for s in range(3)]
    weights = [torch.rand(2, 57, generator=torch.Generator().manual_seed(10 + s)).to(device) for s in range(3)]
    out = torch.full((203,), 0.5, dtype=out_dtype, device=device)
    for h, w in zip(batches, weights):
        ret = tk.channel_scores(h, w, out=out)
        assert ret is out
    expected = 0.5 + sum(f64_scores(h, w) for h, w in zip(batches, weights))
    assert out.dtype == out_dtype
    assert_close(out, expected, rtol=1e-5, atol=score_atol(3 * 114), what=f"out= accumulation {out_dtype}")


def test_channel_scores_deterministic_across_programs(device):
    h = make((1000, 300), torch.bfloat16, device)
    w = torch.rand(1000).to(device)
    progs, _ = tk.row_programs(1000, 3)
    assert progs > 1, "the test must exercise the two-stage reduction"
    first = tk.channel_scores(h, w)
    assert all(torch.equal(first, tk.channel_scores(h, w)) for _ in range(2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("lead,C", [((1,), 1), ((3, 37), 203), ((2, 17), 1041), ((289,), 129)])
def test_glu_and_score_matches_f64(lead, C, dtype, act, device):
    g, u = make((*lead, C), dtype, device, 3), make((*lead, C), dtype, device, 4)
    w = (torch.rand(lead, generator=torch.Generator().manual_seed(5)) > 0.3).float().to(device)
    scores = torch.zeros(C, dtype=torch.float64, device=device)
    h = tk.glu_and_score(g, u, activation=act, weights=w, scores=scores)
    assert h.dtype == dtype and h.shape == g.shape
    expected_h = f64_glu(g, u, act)
    rtol, rows = RTOL[dtype], h.numel() // C
    atol = rtol * 1e-2
    if act == "gelu_tanh" and g.is_cuda:
        # On a GPU gelu is torch's formula 0.5 g (1 + tanh y): the sum is exact to 2^-24 of its larger term, 1,
        # so where 1 + tanh y cancels (g << 0) the error is up to 2^-24 |g u| absolute, not relative.
        atol = max(atol, 4 * 2.0 ** -24 * float((g.double() * u.double()).abs().max()))
    assert_close(h, expected_h, rtol=2 * rtol, atol=atol, what=f"glu h {act} {dtype}")
    # Scores use the h down_proj receives: exactly the kernel's own rounded h ...
    assert_close(scores, f64_scores(h, w), rtol=1e-5, atol=score_atol(rows), what=f"glu scores vs own h {dtype}")
    # ... which is within dtype tolerance of the float64 act-and-mul.
    assert_close(scores, f64_scores(expected_h, w), rtol=4 * rtol, atol=rtol * score_atol(rows),
                 what=f"glu scores vs f64 {act} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_glu_fused_layout_equals_split_layout(dtype, device):
    g, u = make((4, 33, 211), dtype, device, 6), make((4, 33, 211), dtype, device, 7)
    w = torch.rand(4, 33).to(device)
    s_split = torch.zeros(211, dtype=torch.float64, device=device)
    s_fused = torch.zeros(211, dtype=torch.float64, device=device)
    h_split = tk.glu_and_score(g, u, activation="gelu_tanh", weights=w, scores=s_split)
    h_fused = tk.glu_and_score(torch.cat([g, u], -1), activation="gelu_tanh", weights=w, scores=s_fused)
    assert torch.equal(h_split, h_fused) and torch.equal(s_split, s_fused)


def test_glu_strided_inputs_and_no_scores(device):
    fused = make((3, 50, 2 * 160), torch.float16, device, 8)[:, ::2]
    g, u = fused[..., :160], fused[..., 160:]
    expected = f64_glu(g, u, "silu")
    assert_close(tk.glu_and_score(fused), expected, rtol=2 * RTOL[torch.float16], atol=1e-4, what="glu strided fused")
    g_t = make((160, 25), torch.float16, device, 9).t()  # channel stride 25
    u_t = make((160, 25), torch.float16, device, 10).t()
    assert_close(tk.glu_and_score(g_t, u_t), f64_glu(g_t, u_t, "silu"), rtol=2 * RTOL[torch.float16], atol=1e-4,
                 what="glu channel-strided")


def test_glu_deterministic(device):
    g, u = make((700, 150), torch.bfloat16, device, 11), make((700, 150), torch.bfloat16, device, 12)
    runs = []
    for _ in range(2):
        s = torch.zeros(150, dtype=torch.float64, device=device)
        runs.append((tk.glu_and_score(g, u, scores=s), s))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_extreme_gate_values_stay_finite(device):
    g = torch.tensor([[-1e4, -90.0, -20.0, 0.0, 20.0, 90.0, 1e4]], device=device)
    u = torch.ones_like(g)
    for act in ("silu", "gelu_tanh"):
        h = tk.glu_and_score(g, u, activation=act)
        assert torch.isfinite(h).all(), f"{act}: {h}"
        assert_close(h, f64_glu(g, u, act), rtol=1e-5, atol=1e-6, what=f"{act} extremes")


def test_empty_inputs(device):
    assert torch.equal(tk.channel_scores(torch.empty(0, 5, device=device)), torch.zeros(5, device=device))
    assert tk.channel_scores(torch.empty(3, 0, device=device)).shape == (0,)
    out = torch.ones(5, dtype=torch.float64, device=device)
    assert torch.equal(tk.channel_scores(torch.empty(2, 0, 5, device=device), out=out), torch.ones(5, dtype=torch.float64, device=device))
    s = torch.zeros(4, device=device)
    assert tk.glu_and_score(torch.empty(0, 4, device=device), torch.empty(0, 4, device=device), scores=s).shape == (0, 4)
    assert not s.any()


def test_grid_and_partial_order_depend_on_the_shape_only():
    """No device argument, no SM count: the same rows x column tiles give the same programs on any GPU, so
    the same partial sums are added in the same order (bit-identical scores across GPU models)."""
    import inspect

    assert list(inspect.signature(tk.row_programs).parameters) == ["rows", "col_blocks", "config"]
    rows, cols = 16 * 2048, -(-14336 // tk.CONFIG.block_c)
    progs, per = tk.row_programs(rows, cols)
    assert (progs, per) == (19, 1728) and progs * per >= rows > (progs - 1) * per
    assert per % tk.CONFIG.block_t == 0
    source = inspect.getsource(tk)
    assert "multi_processor_count" not in source and "get_device_properties" not in source


def test_flat_layout_detection(device):
    """Contiguous tensors take the division-free row offsets; split leading dims keep the general path."""
    assert tk._flat(32768, 32768, [(0, 14336, 1)])
    assert tk._flat(6, 3, [(30, 10, 1)])
    assert not tk._flat(6, 3, [(40, 10, 1)])
    x = make((4, 6, 10), torch.float32, device)[:, :3]  # rows 4 x 3 with a gap between the leading dims
    (_,), rows, d1, strides = __import__("compact_kernels._checks", fromlist=["row_layout"]).row_layout(x)
    assert (rows, d1) == (12, 3) and not tk._flat(rows, d1, strides)
    assert_close(tk.channel_scores(x), f64_scores(x), rtol=1e-5, atol=score_atol(12), what="split leading dims")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the interpreter has no libdevice)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_glu_h_is_torchs_act_and_mul_bit_for_bit(dtype, act):
    """On the GPU, h is exactly what the model's own `act(gate) * up` gives down_proj."""
    from compact_kernels import reference

    g, u = make((2048, 4096), dtype, "cuda", 11), make((2048, 4096), dtype, "cuda", 12)
    h = tk.glu_and_score(g, u, activation=act, scores=torch.zeros(4096, dtype=torch.float64, device="cuda"))
    want = reference.apply_activation(g, act) * u
    assert torch.equal(h, want), f"{act} {dtype}: {int((h != want).sum())} of {h.numel()} elements differ"
