"""End-to-end calibration: `compact.score_channels` against the hook-based scoring users write today.

The baseline ("hooks_full_forward", tests/hook_baseline.py, also the tests' reference) is what a user writes
without this package: a full `model(...)` forward (LM head and logits included, default arguments) under
`torch.no_grad()`, with a forward pre-hook on every `down_proj` that adds `(h.float()**2 * w[..., None]).sum((0, 1))`
(float32 per batch) into a float64 total.
`score_channels` runs the decoder only, stops after the last MLP, and scores inside the MLP.

Both run on the same model (real configs, random weights, seeded), the same token ids and weights (kept
vocabulary = the lowest 2/3 of the ids, attention mask of ones), the same device, dtype and batch size,
alternating (baseline first, then ours, then ours first, ...). Reported per shape: the median over the
pairs of baseline time / ours, tokens/s, peak memory, and the largest score difference; the run asserts
that both give the same scores (relative to each layer's largest score, --rtol, default 1e-3) and that
repeated runs of ours are bit-identical.

Memory: on a CPU every run is a fresh subprocess (`python bench/calibration.py --worker ...`) that loads
the model from a safetensors copy written once by the parent, so the RSS belongs to one variant. Peak =
VmHWM of the timed pass (reset after the one-batch warm-up with /proc/self/clear_refs; where that is
impossible, ru_maxrss of the whole process); `model_mib` = the RSS after loading and touching every weight;
`work_mib` = peak - model. On a GPU both variants run in one process (the model is built on the device
once); peak = torch.cuda.max_memory_allocated of the timed pass, model = memory allocated before it.

Shared machines: on a CPU each run first waits (up to --quiet-wait seconds) until the machine is idle, and
every run records `other_cpu`, the share of all cores that other processes used while it ran (/proc/stat
busy time minus the worker's own CPU time). A pair with a run above --max-other is kept in the runs CSV
with used=False and measured again (at most --repeats extra pairs); `other_cpu_max` in the summary is over
the pairs used.

Usage (from the repository root):
    python bench/calibration.py                      # CPU here: Qwen2.5-0.5B and Llama-3.2-1B shapes
    python bench/calibration.py --device cuda        # + Llama-3.1-8B, 16 x 2048 tokens, bf16
    python bench/calibration.py --shapes qwen2.5-0.5b --repeats 1   # a quicker look
Writes bench/results/calibration_<device>.csv (one row per shape and variant), calibration_<device>_runs.csv
(every timed run) and calibration_<device>.png. Exit 1 when the scores disagree.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.hook_baseline import hook_scores

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("hooks_full_forward", "score_channels")
SEED = 0

# Shapes from the real configs (random weights). cpu: (samples, seq_len) used on a CPU; None = GPU only.
SHAPES = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", cpu=(4, 512),
        config=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, hidden_act="silu",
                    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "llama-3.2-1b": dict(
        model_type="llama", cpu=(4, 512),
        config=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                    hidden_act="silu", max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))),
    "llama-3.1-8b": dict(
        model_type="llama", cpu=None,
        config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                    hidden_act="silu", max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))),
}
# A few-second shape for smoke runs and the tests; never measured by default.
SHAPES["tiny-llama"] = dict(
    model_type="llama", cpu=(4, 32), smoke=True,
    config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False, max_position_embeddings=256))
GPU_TOKENS = (16, 2048)
FIELDS = ["shape", "variant", "device", "dtype", "samples", "seq_len", "batch_size", "tokens", "runs",
          "s_median", "s_min", "s_max", "tokens_per_s", "speedup_median", "speedups", "peak_mib", "model_mib",
          "work_mib", "memory", "other_cpu_max", "max_rel_diff_layer", "max_rel_diff_elem", "rtol", "agree",
          "machine", "torch", "transformers", "triton", "python", "command"]
RUN_FIELDS = ["shape", "variant", "device", "pair", "order", "seconds", "tokens_per_s", "peak_mib", "model_mib",
              "other_cpu", "used"]


# ----------------------------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if device == "cuda":
        name = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        name = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {"machine": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------ model + data

def make_config(shape: str):
    from transformers import AutoConfig

    spec = SHAPES[shape]
    config = AutoConfig.for_model(spec["model_type"], **spec["config"])
    config._attn_implementation = "sdpa"
    return config


def build_model(shape: str, dtype: torch.dtype, device: str):
    """The shape's model with seeded random weights (the model's own init), in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(make_config(shape), dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def load_model(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()


def make_data(vocab: int, samples: int, seq_len: int, device: str):
    """(input_ids, attention_mask, kept ids, keep table): seeded uniform ids, kept = the lowest 2/3 of the ids."""
    gen = torch.Generator().manual_seed(SEED + 1)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    keep = (2 * vocab) // 3
    table = (torch.arange(vocab) < keep).float()
    return ids.to(device), mask.to(device), range(keep), table.to(device)


# ---------------------------------------------------------------------------------------------- variants

def ours(model, ids, mask, kept, batch_size: int) -> dict[str, torch.Tensor]:
    from compact.scoring import score_channels

    return score_channels(model, ids, mask, keep_token_ids=kept, batch_size=batch_size, progress=False)


def run_variant(variant: str, model, ids, mask, kept, table, batch_size: int) -> dict[str, torch.Tensor]:
    if variant == "hooks_full_forward":
        return hook_scores(model, ids, mask, table, batch_size)
    return ours(model, ids, mask, kept, batch_size)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_mib() -> float:
    from compact.memory import rss_bytes

    return rss_bytes() / 2**20


def peak_rss_mib() -> float:
    from compact.memory import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def reset_peak_rss() -> bool:
    from compact.memory import reset_peak_rss as reset

    return reset()


def busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have been busy (/proc/stat), or None where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """Share of all cores used by other processes between start() and stop() (None where unknown)."""

    def start(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), busy_seconds(), own_cpu_seconds()

    def stop(self) -> float | None:
        wall, busy = time.perf_counter() - self.t, busy_seconds()
        if busy is None or self.busy is None or wall <= 0:
            return None
        other = (busy - self.busy) - (own_cpu_seconds() - self.own)
        return max(0.0, other / (wall * (os.cpu_count() or 1)))


def wait_until_quiet(limit_s: float, threshold: float = 0.1, window_s: float = 2.0) -> float | None:
    """Wait up to limit_s for a window in which the machine is below `threshold` busy; the last share seen."""
    deadline, share = time.monotonic() + limit_s, None
    while True:
        load = OtherLoad()
        load.start()
        time.sleep(window_s)
        share = load.stop()
        if share is None or share < threshold or time.monotonic() >= deadline:
            return share


def timed(variant, model, ids, mask, kept, table, batch_size, device) -> tuple[float, dict]:
    """(seconds, scores) of one full pass over the data, after a one-batch warm-up of the same variant.

    The memory peak is reset after the warm-up: memory_peak() afterwards is the timed pass's peak."""
    run_variant(variant, model, ids[:batch_size], mask[:batch_size], kept, table, batch_size)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    sync(device)
    start = time.perf_counter()
    scores = run_variant(variant, model, ids, mask, kept, table, batch_size)
    sync(device)
    return time.perf_counter() - start, scores


# ------------------------------------------------------------------------------------ comparison of scores

def compare(a: dict, b: dict) -> tuple[float, float]:
    """(max over layers of max|a-b| / max|b|, max over channels of |a-b| / |b|) between two score dicts."""
    assert list(a) == list(b), f"layer names differ: {list(a)[:3]} vs {list(b)[:3]}"
    layer, elem = 0.0, 0.0
    for name in b:
        x, y = a[name].double().cpu(), b[name].double().cpu()
        diff = (x - y).abs()
        layer = max(layer, float(diff.max() / y.abs().max().clamp_min(1e-300)))
        elem = max(elem, float((diff / y.abs().clamp_min(1e-300)).max()))
    return layer, elem


def identical(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# -------------------------------------------------------------------------------------------- CPU worker

def worker(spec: dict) -> None:
    """One variant, one fresh process: load, touch the weights, warm up, time one pass, save the scores."""
    from safetensors.torch import save_file

    dtype = getattr(torch, spec["dtype"])
    model = load_model(spec["model_dir"], dtype)
    with torch.no_grad():
        for p in model.parameters():  # fault every weight page in: the model's share of the RSS
            p.sum()
    gc.collect()
    model_mib = rss_mib()
    ids, mask, kept, table = make_data(model.config.vocab_size, spec["samples"], spec["seq_len"], "cpu")
    load = OtherLoad()
    load.start()
    seconds, scores = timed(spec["variant"], model, ids, mask, kept, table, spec["batch_size"], "cpu")
    other = load.stop()
    save_file({k: v.contiguous() for k, v in scores.items()}, spec["scores_out"])
    print("RESULT " + json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib(), "model_mib": model_mib,
                                  "other_cpu": other}), flush=True)


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=str(ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {spec['variant']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------- measurement

def orders(repeats: int) -> list[tuple[str, str]]:
    """Alternating orders: (baseline, ours), (ours, baseline), ..."""
    return [VARIANTS if i % 2 == 0 else VARIANTS[::-1] for i in range(repeats)]


def measure_cpu(shape: str, args, tmp: Path) -> tuple[list[dict], dict, dict]:
    """Per-run rows and the scores of each variant (first run), CPU: every run a fresh subprocess.

    A pair in which other processes used more than --max-other of the machine during either run is kept in
    the runs CSV (used=False) and measured again, up to --repeats extra pairs in all."""
    from safetensors.torch import load_file

    samples, seq_len = args.samples or SHAPES[shape]["cpu"][0], args.seq_len or SHAPES[shape]["cpu"][1]
    folder = tmp / shape
    t0 = time.perf_counter()
    build_model(shape, torch.float32, "cpu").save_pretrained(folder)
    gc.collect()
    print(f"  {shape}: built and saved the random model in {time.perf_counter() - t0:.0f} s", flush=True)
    rows, first, repeat_ok = [], {}, True
    used = attempt = 0
    while used < args.repeats and attempt < 2 * args.repeats:
        order = VARIANTS if used % 2 == 0 else VARIANTS[::-1]
        pair_rows = []
        for position, variant in enumerate(order):
            out = tmp / f"{shape}-{variant}-{attempt}.safetensors"
            spec = dict(variant=variant, model_dir=str(folder), dtype=args.dtype, samples=samples, seq_len=seq_len,
                        batch_size=args.batch_size, scores_out=str(out))
            if args.quiet_wait > 0:
                before = wait_until_quiet(args.quiet_wait)
                if before is not None and before >= 0.1:
                    print(f"  (machine still {100 * before:.0f}% busy with other work after {args.quiet_wait:.0f} s)")
            res = run_worker(spec)
            scores = load_file(str(out))
            out.unlink()
            if variant in first:
                repeat_ok &= variant != "score_channels" or identical(scores, first[variant])
            else:
                first[variant] = scores
            pair_rows.append(dict(shape=shape, variant=variant, device="cpu", pair=used, order=position,
                                  seconds=res["seconds"], tokens_per_s=samples * seq_len / res["seconds"],
                                  peak_mib=res["peak_mib"], model_mib=res["model_mib"], other_cpu=res["other_cpu"],
                                  used=True))
            other = "" if res["other_cpu"] is None else f"  others used {100 * res['other_cpu']:.0f}% of the CPU"
            print(f"  {shape} pair {used} {variant:<19} {res['seconds']:8.2f} s  peak RSS {res['peak_mib']:8.0f} MiB"
                  f"{other}", flush=True)
        attempt += 1
        busy = [r["other_cpu"] for r in pair_rows if r["other_cpu"] is not None and r["other_cpu"] > args.max_other]
        if busy and attempt < 2 * args.repeats:
            print(f"  pair discarded: other processes used up to {100 * max(busy):.0f}% of the CPU "
                  f"(> --max-other {args.max_other:g}); measuring it again", flush=True)
            for r in pair_rows:
                r.update(used=False, pair="")
        else:
            used += 1
        rows += pair_rows
    shutil.rmtree(folder, ignore_errors=True)
    return rows, first, {"samples": samples, "seq_len": seq_len, "repeat_identical": repeat_ok}


def memory_now(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else rss_mib()


def memory_peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()


def memory_kind(args) -> str:
    if args.device == "cuda":
        return "cuda max_memory_allocated during the timed pass"
    where = "one process for both variants" if args.in_process else "fresh process per run"
    if reset_peak_rss():
        return f"peak RSS (VmHWM) during the timed pass, {where}"
    return f"peak RSS (ru_maxrss) of the whole process, {where}"


def measure_in_process(shape: str, args) -> tuple[list[dict], dict, dict]:
    """Per-run rows and scores from one process: the model built on the device once, variants alternating.

    The GPU path (peak = torch.cuda.max_memory_allocated after a reset before each timed run). On a CPU
    (--in-process) the peak is the process's peak RSS so far, so it is not per variant."""
    device = args.device
    cuda = device == "cuda"
    samples = args.samples or (GPU_TOKENS[0] if cuda else SHAPES[shape]["cpu"][0])
    seq_len = args.seq_len or (GPU_TOKENS[1] if cuda else SHAPES[shape]["cpu"][1])
    t0 = time.perf_counter()
    model = build_model(shape, getattr(torch, args.dtype), device)
    print(f"  {shape}: built the random model on {device} in {time.perf_counter() - t0:.0f} s", flush=True)
    ids, mask, kept, table = make_data(model.config.vocab_size, samples, seq_len, device)
    rows, first, repeat_ok = [], {}, True
    for pair, order in enumerate(orders(args.repeats)):
        for position, variant in enumerate(order):
            if cuda:  # (timed() collects too, after the warm-up; a full gc.collect costs ~0.3 s here)
                gc.collect()
                torch.cuda.empty_cache()
            model_mib = memory_now(device)
            seconds, scores = timed(variant, model, ids, mask, kept, table, args.batch_size, device)
            peak = memory_peak(device)
            scores = {k: v.cpu() for k, v in scores.items()}
            if variant in first:
                repeat_ok &= variant != "score_channels" or identical(scores, first[variant])
            else:
                first[variant] = scores
            rows.append(dict(shape=shape, variant=variant, device=device, pair=pair, order=position, seconds=seconds,
                             tokens_per_s=samples * seq_len / seconds, peak_mib=peak, model_mib=model_mib,
                             other_cpu=None, used=True))
            print(f"  {shape} pair {pair} {variant:<19} {seconds:8.3f} s  peak {peak:8.0f} MiB", flush=True)
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return rows, first, {"samples": samples, "seq_len": seq_len, "repeat_identical": repeat_ok}


def summarize(shape: str, rows: list[dict], first: dict, meta: dict, args, info: dict) -> list[dict]:
    """One row per variant: medians, the median speedup over pairs, and the score agreement."""
    by = {v: [r for r in rows if r["variant"] == v and r["used"]] for v in VARIANTS}
    speedups = [b["seconds"] / o["seconds"] for b, o in zip(by["hooks_full_forward"], by["score_channels"])]
    layer, elem = compare(first["score_channels"], first["hooks_full_forward"])
    tokens = meta["samples"] * meta["seq_len"]
    out = []
    for variant, runs in by.items():
        secs = [r["seconds"] for r in runs]
        peak = max(r["peak_mib"] for r in runs)
        model_mib = statistics.median(r["model_mib"] for r in runs)
        ours_row = variant == "score_channels"
        others = [r["other_cpu"] for r in runs if r["other_cpu"] is not None]
        out.append({
            "shape": shape, "variant": variant, "device": args.device, "dtype": args.dtype,
            "samples": meta["samples"], "seq_len": meta["seq_len"], "batch_size": args.batch_size, "tokens": tokens,
            "runs": len(runs), "s_median": f"{statistics.median(secs):.4g}", "s_min": f"{min(secs):.4g}",
            "s_max": f"{max(secs):.4g}", "tokens_per_s": f"{tokens / statistics.median(secs):.1f}",
            "speedup_median": f"{statistics.median(speedups):.3f}" if ours_row else "1",
            "speedups": " ".join(f"{s:.3f}" for s in speedups) if ours_row else "",
            "peak_mib": f"{peak:.0f}", "model_mib": f"{model_mib:.0f}", "work_mib": f"{peak - model_mib:.0f}",
            "memory": memory_kind(args),
            "other_cpu_max": f"{max(others):.3f}" if others else "",
            "max_rel_diff_layer": f"{layer:.3g}", "max_rel_diff_elem": f"{elem:.3g}", "rtol": args.rtol,
            "agree": layer <= args.rtol and meta["repeat_identical"], **info, "command": args.command})
    return out


# -------------------------------------------------------------------------------------------------- plot

def plot(summary: list[dict], png: Path) -> None:
    from bench.plot import pyplot

    plt = pyplot("bench/calibration")
    if plt is None:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in summary))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.38
    for k, variant in enumerate(VARIANTS):
        rows = {r["shape"]: r for r in summary if r["variant"] == variant}
        xs = [i + (k - 0.5) * width for i in range(len(shapes))]
        tps = [float(rows[s]["tokens_per_s"]) for s in shapes]
        bars = ax_t.bar(xs, tps, width, label=variant)
        if variant == "score_channels":
            for bar, s in zip(bars, shapes):
                ax_t.annotate(f"{float(rows[s]['speedup_median']):.2f}x", (bar.get_x() + bar.get_width() / 2,
                              bar.get_height()), ha="center", va="bottom", fontsize=9)
        model = [float(rows[s]["model_mib"]) for s in shapes]
        work = [float(rows[s]["work_mib"]) for s in shapes]
        ax_m.bar(xs, model, width, color=f"C{k}", alpha=0.45)
        ax_m.bar(xs, work, width, bottom=model, color=f"C{k}", label=f"{variant} (light: model)")
    first = summary[0]
    labels = [f"{s}\n{r['samples']}x{r['seq_len']}, bs {r['batch_size']}"
              for s, r in ((s, next(r for r in summary if r["shape"] == s)) for s in shapes)]
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(shapes)), labels, fontsize=8)
        ax.legend(fontsize=8)
    ax_t.set_ylabel("tokens / s (median)")
    ax_t.set_title("calibration throughput (label: median speedup)", fontsize=10)
    ax_m.set_ylabel("MiB")
    ax_m.set_title(f"peak memory ({first['memory']})", fontsize=10)
    fig.suptitle(f"{first['machine']} | {first['dtype']} | torch {first['torch']}, transformers "
                 f"{first['transformers']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"bench/calibration: wrote {png}")


# ---------------------------------------------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated, from {', '.join(SHAPES)} (default: every shape the device runs)")
    parser.add_argument("--samples", type=int, default=None, help="sequences (default: per shape on CPU, 16 on GPU)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512 CPU, 2048 GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default 2 CPU, 4 GPU)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating pairs (default 3 CPU, 5 GPU)")
    parser.add_argument("--rtol", type=float, default=1e-3, help="score agreement, relative to each layer's maximum")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for CSV and PNG (default {RESULTS})")
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="CPU: wait up to this many seconds for an idle machine before each run (default 600)")
    parser.add_argument("--max-other", type=float, default=0.15,
                        help="CPU: measure a pair again when other processes used more than this share of the "
                             "machine during it (default 0.15)")
    parser.add_argument("--in-process", action="store_true",
                        help="CPU: both variants in this process, as on a GPU (faster; peak RSS not per variant)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch_size = args.batch_size or (4 if cuda else 2)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (5 if cuda else 3)
    args.quiet_wait = (0.0 if cuda or args.in_process else 600.0) if args.quiet_wait is None else args.quiet_wait
    default = [s for s, spec in SHAPES.items() if not spec.get("smoke") and (cuda or spec["cpu"] is not None)]
    args.shapes = default if args.shapes is None else [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    gpu_only = [s for s in args.shapes if SHAPES[s]["cpu"] is None]
    if not cuda and gpu_only:
        parser.error(f"{', '.join(gpu_only)}: GPU only (too large for a CPU run)")
    args.command = "python bench/calibration.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if argv is None:  # as a script: SIGTERM unwinds, so the temporary model copies are removed
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/calibration.py: --device cuda needs a CUDA GPU; nothing measured")
        return 0
    info = machine(args.device)
    print(f"machine: {info['machine']} | torch {info['torch']} | transformers {info['transformers']} | "
          f"triton {info['triton']} | python {info['python']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"calibration_{args.device}"
    summary, all_runs, failures = [], [], []
    with tempfile.TemporaryDirectory(prefix="compact-calibration-") as tmp:
        for shape in args.shapes:
            if args.device == "cpu" and not args.in_process:
                rows, first, meta = measure_cpu(shape, args, Path(tmp))
            else:
                rows, first, meta = measure_in_process(shape, args)
            all_runs += rows
            rows_summary = summarize(shape, rows, first, meta, args, info)
            summary += rows_summary
            ours_row = rows_summary[-1]
            base_row = rows_summary[0]
            print(f"{shape}: speedup {ours_row['speedup_median']}x (pairs {ours_row['speedups']}) | tokens/s "
                  f"{base_row['tokens_per_s']} -> {ours_row['tokens_per_s']} | peak MiB {base_row['peak_mib']} -> "
                  f"{ours_row['peak_mib']} (model {ours_row['model_mib']}) | max rel diff "
                  f"{ours_row['max_rel_diff_layer']} (per channel {ours_row['max_rel_diff_elem']}) | repeats "
                  f"bit-identical {meta['repeat_identical']}",
                  flush=True)
            if not ours_row["agree"]:
                failures.append(shape)
            # Written after every shape: a run cut short keeps what it measured.
            with open(f"{stem}.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                writer.writeheader()
                writer.writerows(summary)
            with open(f"{stem}_runs.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, RUN_FIELDS)
                writer.writeheader()
                writer.writerows({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()}
                                 for r in all_runs)
    print(f"bench/calibration: wrote {stem}.csv and {stem}_runs.csv")
    if not args.no_plot:
        plot(summary, Path(f"{stem}.png"))
    if failures:
        print(f"bench/calibration: scores DISAGREE beyond rtol {args.rtol} (or repeats differ): {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
