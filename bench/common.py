"""Shared microbenchmark machinery: GPU check, timing, peak bandwidth, the measure-and-write loop, CLI."""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton
import triton.testing

import plot

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80
# Peak HBM bandwidth in GB/s, matched as a substring of torch.cuda.get_device_name(); first match wins.
PEAK_GBPS = (
    ("H200", 4800.0),
    ("H100 80GB HBM3", 3350.0),  # H100 SXM
    ("H100 SXM", 3350.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB", 1935.0),  # A100 80GB PCIe
    ("A100-SXM4-40GB", 1555.0),
    ("A100-PCIE-40GB", 1555.0),
)
FIELDS = ["op", "impl", "shape", "tokens", "channels", "dtype", "ms_median", "ms_p20", "ms_p80", "bytes",
          "gbps", "peak_gbps", "pct_peak", "device", "torch", "triton", "note"]
Impls = dict[str, Callable[[], object]]


@dataclass
class Case:
    """One problem to measure: its labels, the bytes it must move, and `build()` -> {impl: fn}.

    `build` allocates the inputs, so tensors live only while their case is measured.
    """
    op: str
    shape: str
    nbytes: int
    build: Callable[[], Impls] = field(repr=False)
    dtype: str = "bfloat16"
    tokens: int | None = None
    channels: int | None = None


def require_gpu(script: str) -> None:
    """Exit 0 with a message when there is no CUDA device: these benchmarks time GPU kernels only."""
    if not torch.cuda.is_available():
        print(f"bench/{script}: needs a CUDA GPU; nothing measured")
        sys.exit(0)


def time_ms(fn: Callable[[], object]) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of fn() by triton.testing.do_bench (L2 flushed between runs)."""
    return tuple(triton.testing.do_bench(fn, quantiles=QUANTILES))


def peak_gbps(device_name: str) -> float | None:
    """The device's peak HBM bandwidth in GB/s, or None when the name is not in PEAK_GBPS."""
    return next((gbps for key, gbps in PEAK_GBPS if key in device_name), None)


def machine() -> dict:
    """Device name, peak bandwidth and library versions, as written into every row."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": name, "peak_gbps": peak_gbps(name), "torch": torch.__version__, "triton": triton.__version__}


def machine_line(info: dict) -> str:
    peak = "unknown" if info["peak_gbps"] is None else f"{info['peak_gbps']:.0f} GB/s"
    return (f"machine: {info['device']} | peak HBM {peak} | torch {info['torch']} (CUDA {torch.version.cuda}) "
            f"| triton {info['triton']} | python {sys.version.split()[0]}")


def _error_note(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _row(case: Case, impl: str, ms, info: dict, note: str = "") -> dict:
    """One CSV row; ms is (median, p20, p80) or None when the implementation failed."""
    peak = info["peak_gbps"]
    row = {"op": case.op, "impl": impl, "shape": case.shape, "tokens": case.tokens, "channels": case.channels,
           "dtype": case.dtype, "bytes": case.nbytes, "peak_gbps": "unknown" if peak is None else peak,
           "pct_peak": "unknown", "device": info["device"], "torch": info["torch"], "triton": info["triton"],
           "note": note}
    if ms is not None:
        gbps = case.nbytes / (ms[0] * 1e-3) / 1e9
        row.update(ms_median=f"{ms[0]:.5g}", ms_p20=f"{ms[1]:.5g}", ms_p80=f"{ms[2]:.5g}", gbps=f"{gbps:.1f}")
        if peak is not None:
            row["pct_peak"] = f"{100 * gbps / peak:.1f}"
    return row


def _measure_case(case: Case, info: dict) -> list[dict]:
    """Rows for every implementation of one case; a failure becomes a row with a note, not an abort."""
    try:
        impls = case.build()
    except Exception as exc:  # e.g. out of memory for the inputs
        return [_row(case, "inputs", None, info, _error_note(exc))]
    rows = []
    for impl, fn in impls.items():
        try:
            rows.append(_row(case, impl, time_ms(fn), info))
        except Exception as exc:
            rows.append(_row(case, impl, None, info, _error_note(exc)))
    return rows


def format_row(row: dict) -> str:
    head = f"{row['op']:<15} {row['impl']:<16} {row['shape']:<24}"
    if row["note"]:
        return f"{head} FAILED {row['note']}"
    pct = "" if row["pct_peak"] == "unknown" else f" {row['pct_peak']:>5}% of peak"
    return (f"{head} {float(row['ms_median']):9.4f} ms [{float(row['ms_p20']):.4f}, {float(row['ms_p80']):.4f}]"
            f" {float(row['gbps']):8.1f} GB/s{pct}")


def run_bench(name: str, cases: Iterable[Case], out_dir: Path, *, make_plot: bool = True) -> int:
    """Measure every case, writing `<out_dir>/<name>.csv` as it goes (and a PNG at the end); returns failures."""
    info = machine()
    print(machine_line(info), flush=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.csv"
    failures = 0
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for case in cases:
            for row in _measure_case(case, info):
                writer.writerow(row)
                print(format_row(row), flush=True)
                failures += bool(row["note"])
            f.flush()
            torch.cuda.empty_cache()
    print(f"bench/{name}: wrote {path}" + (f"; {failures} failed" if failures else ""))
    if make_plot:
        plot.plot_csv(path)
    return failures


def parse_args(name: str, argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"{name} kernel microbenchmarks (CUDA only)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for the CSV and PNG (default {RESULTS})")
    parser.add_argument("--no-plot", action="store_true", help="write the CSV only")
    return parser.parse_args(argv)


def main(name: str, make_cases: Callable[[bool], Iterable[Case]], argv=None) -> None:
    """CLI of a bench script: parse, require a GPU, measure; exit 1 when any implementation failed."""
    args = parse_args(name, argv)
    require_gpu(f"bench_{name}.py")
    failures = run_bench(name, make_cases(args.quick), args.out, make_plot=not args.no_plot)
    sys.exit(1 if failures else 0)
