"""PNG of a bench CSV: GB/s per implementation per shape, one panel per op, a dashed line at peak bandwidth.

Usage: python bench/plot.py bench/results/*.csv   (the bench scripts call plot_csv themselves)
matplotlib is a bench-only dependency: without it the plot is skipped with a message.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def _by_op(rows: list[dict]) -> dict[str, list[dict]]:
    """Measured rows (failed ones have no gbps) grouped by op, in file order."""
    ops: dict[str, list[dict]] = {}
    for row in rows:
        if row["gbps"]:
            ops.setdefault(row["op"], []).append(row)
    return ops


def _panel(ax, op: str, rows: list[dict]) -> None:
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        gbps = {r["shape"]: float(r["gbps"]) for r in rows if r["impl"] == impl}
        xs = [i + (k - (len(impls) - 1) / 2) * width for i, s in enumerate(shapes) if s in gbps]
        ax.bar(xs, [gbps[s] for s in shapes if s in gbps], width, label=impl)
    peak = rows[0]["peak_gbps"]
    if peak != "unknown":
        ax.axhline(float(peak), color="black", linestyle="--", linewidth=1, label=f"peak {float(peak):.0f} GB/s")
    ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title(f"{op} ({rows[0]['dtype']}, {rows[0]['device']})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def pyplot(who: str):
    """matplotlib.pyplot on the Agg backend, or None with a message naming `who` (matplotlib is bench-only)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{who}: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    return plt


def plot_csv(csv_path) -> Path | None:
    """Write <csv stem>.png beside the CSV; None (with a message) without matplotlib or measured rows."""
    csv_path = Path(csv_path)
    plt = pyplot(f"bench/plot ({csv_path.name})")
    if plt is None:
        return None
    with csv_path.open(newline="") as f:
        ops = _by_op(list(csv.DictReader(f)))
    if not ops:
        print(f"bench/plot: no measured rows in {csv_path}; no plot")
        return None
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 4 * len(ops)), squeeze=False)
    for ax, (op, rows) in zip(axes[:, 0], ops.items()):
        _panel(ax, op, rows)
    fig.tight_layout()
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"bench/plot: wrote {png}")
    return png


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        plot_csv(arg)
