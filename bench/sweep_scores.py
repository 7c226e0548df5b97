"""GPU only: time the score kernels under several fixed launch configurations on a Llama-3.1-8B FFN activation
(bf16 [16 x 2048, 14336]), against the measured copy bandwidth; and count where `glu_and_score`'s h differs
from torch's `act(gate) * up` bit for bit. Used to choose `compact_kernels.scores.CONFIG` (results must not
depend on tuning, so the choice is made here, once, and written into the code).

Usage: python bench/sweep_scores.py [--out DIR]   (writes sweep_scores.csv; exit 0 without CUDA)
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [  # (block_t, block_c, num_warps, num_stages, target_programs)
    (32, 128, 4, 3, 2048), (32, 128, 8, 3, 2048), (16, 128, 4, 3, 2048), (32, 256, 8, 3, 2048),
    (32, 128, 8, 2, 2048), (32, 128, 8, 4, 2048), (32, 128, 8, 1, 2048), (64, 128, 8, 1, 2048),
    (32, 128, 8, 3, 1024), (32, 128, 8, 3, 4096), (16, 128, 4, 3, 4096), (32, 128, 4, 1, 528),
]


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_gbps() -> float:
    x = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--default-only", action="store_true", help="time only compact_kernels.scores.CONFIG")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/sweep_scores.py: no CUDA device; nothing measured")
        return 0
    from compact_kernels import scores

    torch.manual_seed(0)
    T, C = 16 * 2048, 14336
    h = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
    g, u = torch.randn_like(h), torch.randn_like(h)
    w = (torch.rand(T, device="cuda") < 0.8).float()
    s = torch.zeros(C, dtype=torch.float64, device="cuda")
    peak = copy_gbps()
    print(f"device {torch.cuda.get_device_name()} | copy {peak:.0f} GB/s (read + write) | triton "
          f"{__import__('triton').__version__} | torch {torch.__version__}")
    rows = []
    act_mul = bench(lambda: F.silu(g) * u)
    rows.append(dict(op="act_and_mul", config="torch", ms=act_mul, gbps=3 * h.numel() * 2 / act_mul / 1e6))
    from dataclasses import astuple

    for spec in [astuple(scores.CONFIG)] if args.default_only else CONFIGS:
        cfg = scores.Config(*spec)
        name = "t{}xc{} w{} s{} p{}".format(*spec)
        try:
            ms = bench(lambda: scores.channel_scores(h, w, config=cfg))
            rows.append(dict(op="channel_scores", config=name, ms=ms, gbps=h.numel() * 2 / ms / 1e6))
            ms = bench(lambda: scores.glu_and_score(g, u, weights=w, scores=s, config=cfg))
            rows.append(dict(op="glu_and_score", config=name, ms=ms, gbps=3 * h.numel() * 2 / ms / 1e6))
            ms = bench(lambda: scores.glu_and_score(g, u, config=cfg))
            rows.append(dict(op="glu_only", config=name, ms=ms, gbps=3 * h.numel() * 2 / ms / 1e6))
        except Exception as e:  # noqa: BLE001 - a config that does not launch is a result too
            rows.append(dict(op="error", config=name, ms=float("nan"), gbps=0.0, note=str(e)[:200]))
    for r in rows:
        r["pct_copy"] = 100 * r["gbps"] / peak
        r.setdefault("ratio_to_act_mul", r["ms"] / act_mul)
        print(f"{r['op']:<16} {r['config']:<22} {r['ms']:8.4f} ms {r['gbps']:8.1f} GB/s {r['pct_copy']:5.1f}% "
              f"of copy  x{r['ratio_to_act_mul']:.2f} act-and-mul {r.get('note', '')}")
    for dtype in (torch.bfloat16, torch.float16):
        for act, ref in (("silu", F.silu), ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))):
            gg, uu = g.to(dtype), u.to(dtype)
            want = ref(gg) * uu
            got = scores.glu_and_score(gg, uu, activation=act)
            diff = int((got != want).sum())
            worst = (got.float() - want.float()).abs().max().item()
            print(f"bit-exact vs torch {act}(gate) * up, {str(dtype)[6:]}: {diff} of {got.numel()} elements differ "
                  f"(max |diff| {worst:.3g})")
            rows.append(dict(op=f"exact_{act}_{str(dtype)[6:]}", config="glu_and_score", ms=0, gbps=0, pct_copy=0,
                             ratio_to_act_mul=0, note=f"{diff} differ of {got.numel()}"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "sweep_scores.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["op", "config", "ms", "gbps", "pct_copy", "ratio_to_act_mul", "note"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"bench/sweep_scores.py: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
