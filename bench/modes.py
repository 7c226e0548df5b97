"""The default prune of SmolLM2-135M in every mode of the one engine, on this CPU: one process against torchrun
with 2 ranks (the same work: 2 threads against 2 ranks of 1 thread), and what a checkpoint costs per layer.

The prune is `compact prune SmolLM2 --target-params 0.65 --calib <first half of sotu.txt> --samples 16 --seq-len
512` (the sequential re-fit), as bench/real_models.py's `t0.65-default` row. Rows:
- `1 process` (2 threads, and 1) / `2 ranks` (1 thread each): wall seconds of the whole command (a fresh process,
  startup and writing included); whether a prune kept the same vocabulary and channels as its reference and its
  largest tensor difference in float32 steps of the tensor's scale: 2 ranks against 1 process of 1 thread (the
  same float32 forward per batch: only the order of the float64 sums differs), 1 thread against 2 (the GEMMs of
  a batch rounded another way);
- `checkpoint`: the same prune with --checkpoint-every 1, in this process: per layer, the seconds `save` took
  and the checkpoint's size on disk (streams, sums, the kept channels and re-fits of the layers done).

Usage: python bench/modes.py   (~8 min on 2 cores); writes bench/results/modes.csv and modes_checkpoints.csv.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from bench.real_models import cpu_name  # noqa: E402
from tests import real_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PRUNE = ["--target-params", "0.65", "--samples", "16", "--seq-len", "512", "--quiet"]


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> dict:
    """Whether two prunes kept the same vocabulary and channels, wrote the same bytes, and their largest tensor
    difference in float32 steps of the tensor's largest magnitude (2^-23 of it)."""
    import json

    import torch
    from safetensors.torch import load_file

    reports = [json.loads((p / "compact_report.json").read_text()) for p in (a, b)]
    same_kept = all(reports[0][k] == reports[1][k] for k in ("kept_token_ids", "kept_channels", "sizes"))
    tensors = [{k: v for f in sorted(p.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}
               for p in (a, b)]
    steps = 0.0
    for name, x in tensors[0].items():
        y = tensors[1][name].float()
        scale = torch.finfo(torch.float32).eps * float(y.abs().max().clamp_min(1e-30))
        steps = max(steps, float((x.float() - y).abs().max()) / scale)
    return {"same_vocabulary_and_channels": same_kept, "same_bytes": steps == 0, "max_diff_float32_steps": steps}


def checkpoint_costs(args: list[str], out: Path) -> list[dict]:
    """Per layer: the seconds runs.save took and the size of the checkpoint it left, in this process."""
    from compact import cli, runs

    rows, save = [], runs.save

    def measured(checkpoints, group, next_layer, tensors, streams=None):
        start = time.perf_counter()
        save(checkpoints, group, next_layer, tensors, streams)
        seconds = time.perf_counter() - start
        folder = Path(checkpoints.folder) / f"{checkpoints.name}.layer{next_layer:05d}.rank{group.rank}"
        size = sum(p.stat().st_size for p in folder.iterdir())
        rows.append({"pass": checkpoints.name.split("-")[0], "next_layer": next_layer, "save_s": round(seconds, 4),
                     "mib": round(size / 2**20, 2), "streams": streams is not None})

    runs.save = measured
    try:
        assert cli.main([*args, "--out", str(out), "--checkpoint-every", "1"]) == 0
    finally:
        runs.save = save
    return rows


def main() -> int:
    model = real_model.checkpoint_or_say("bench/modes.py")
    if model is None:
        return 0
    work = Path(tempfile.mkdtemp(prefix="compact-modes-"))
    try:
        calib, _ = real_model.split_text(ROOT.parent / "shared" / "data" / "sotu.txt", work)
        args = ["prune", str(model), "--calib", str(calib), *PRUNE]
        one = timed([sys.executable, "-m", "compact", *args, "--out", str(work / "one")], {"OMP_NUM_THREADS": "2"})
        single = timed([sys.executable, "-m", "compact", *args, "--out", str(work / "single")],
                       {"OMP_NUM_THREADS": "1"})
        two = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                     "compact", *args, "--out", str(work / "two")], {"OMP_NUM_THREADS": "1"})
        cpu = cpu_name()
        runs = [("1 process", 2, one, work / "one"), ("1 process", 1, single, work / "single"),
                ("torchrun, 2 ranks (gloo)", 1, two, work / "two")]
        RESULTS.mkdir(exist_ok=True)
        with (RESULTS / "modes.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, ["mode", "threads_per_process", "seconds", "ratio_to_2_threads", "against",
                                   "same_vocabulary_and_channels", "same_bytes", "max_diff_float32_steps", "cpu"])
            w.writeheader()
            for mode, threads, seconds, folder in runs:
                against = runs[1] if folder == work / "two" else runs[0]  # 2 ranks: against 1 thread per process
                same = {} if folder == work / "one" else {"against": f"{against[0]}, {against[1]} thread(s)",
                                                          **compare(folder, against[3])}
                w.writerow({"mode": mode, "threads_per_process": threads, "seconds": round(seconds, 1),
                            "ratio_to_2_threads": round(seconds / one, 2), **same, "cpu": cpu})
                print(mode, threads, f"{seconds:.1f} s", same)
        rows = checkpoint_costs(args, work / "checkpointed")
        with (RESULTS / "modes_checkpoints.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, [*rows[0], "cpu"])
            w.writeheader()
            w.writerows({**r, "cpu": cpu} for r in rows)
        print(f"checkpoints: {len(rows)}, save {sum(r['save_s'] for r in rows):.2f} s in all, "
              f"largest {max(r['mib'] for r in rows):.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
