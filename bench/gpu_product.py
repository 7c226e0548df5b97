"""The whole product on a GPU, step by step, beside the paper's figures (COMPACT, arXiv 2509.06836: Llama-3.1-8B
pruned in 32 s and Llama-3.1-70B in 2 min 17 s on one A100; the pruned 8B at 0.64x memory, 1.37x throughput).

Steps, each in its own process under its own time limit, each writing a CSV under --out (and all of them the log
gpu_product.log and the step table gpu_product_steps.csv):

- checkpoint   a Llama-3.1-8B-shaped checkpoint with random bf16 weights, generated on the GPU, written once to
               --work (~16 GB), and 16 x 2048 random calibration token ids;
- prune        `compact prune --target-params 0.65` with the default re-fit, in process, phase by phase (load,
               then the pipeline's own phases), beside the paper's 32 s;
- layerwise    the same with --offload layerwise under a GPU memory cap that the model does not fit (a stand-in
               for 70B on one GPU): seconds per layer, extrapolated to the 80 layers of the 70B shape;
- speed        prefill and decode tokens/s, weight and peak memory of the original and the pruned model;
- utilisation  the calibration pass's model-FLOP utilisation: decoder FLOPs / time / the bf16 matrix rate
               measured in the same process, eager at several batch sizes and with torch.compile of the
               attention blocks (scores compared with eager);
- torchrun     the same prune as the `compact` command under `torchrun --nproc-per-node 1` (NCCL on a GPU, gloo
               on the CPU; one process joins no process group, but runs the ranks' code path): in memory, then
               with --offload layerwise --checkpoint-every 8 (1 on --dry's 2 layers) under layerwise's GPU cap;
               rc, seconds, whether the written tensors are finite, the report's re-fit (must be sequential),
               whether the checkpoints were seen in OUT.ckpt and whether OUT.ckpt was removed at the end.

--quick skips layerwise, torchrun and the compiled variant. --dry runs every step on a tiny model on the CPU, in
this process but torchrun's (a test runs it, so that a GPU session never discovers a typo).
Usage: python bench/gpu_product.py [--dry] [--quick] [--out DIR] [--work DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

PAPER = {"prune_8b_s": 32.0, "prune_70b_s": 137.0, "memory": 0.64, "throughput": 1.37}
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256)
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256)
TINY = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)
# step: (seconds allowed, skipped by --quick)
STEPS = {"checkpoint": (120, False), "prune": (120, False), "layerwise": (120, True), "speed": (60, False),
         "utilisation": (90, False), "torchrun": (240, True)}


@dataclass
class Setup:
    """What every step works on: the shape, where it computes, the calibration size, the folders."""

    shape: dict
    device: str
    dtype: str
    samples: int
    seq_len: int
    work: Path
    out: Path
    quick: bool

    @classmethod
    def of(cls, args) -> Setup:
        if args.dry:
            return cls(TINY, "cpu", "float32", 4, 64, Path(args.work), Path(args.out), args.quick)
        return cls(LLAMA_8B, "cuda", "bfloat16", 16, 2048, Path(args.work), Path(args.out), args.quick)

    @property
    def model(self) -> Path:
        return self.work / "model"

    @property
    def calib(self) -> Path:
        return self.work / "calib.npy"

    @property
    def pruned(self) -> Path:
        return self.work / "pruned"

    def write(self, name: str, rows: list[dict]) -> None:
        """Rows to OUT/gpu_product_NAME.csv, and printed."""
        path = self.out / f"gpu_product_{name}.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
        print(f"wrote {path}")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def layer_params(shape: dict) -> int:
    """Parameters of one decoder layer (attention and GLU MLP, norms left out)."""
    d, i = shape["hidden_size"], shape["intermediate_size"]
    kv = d * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return 2 * d * d + 2 * d * kv + 3 * d * i


def decoder_flop_per_token(shape: dict, seq_len: int) -> float:
    """Matrix-product FLOP per token of the decoder layers (no LM head): 2 per weight, plus causal attention's
    q.k and attention x v (2 x 2 x seq x hidden per layer, halved by the causal mask)."""
    return shape["num_hidden_layers"] * (2 * layer_params(shape) + 2 * seq_len * shape["hidden_size"])


# ----------------------------------------------------------------------------------------------- steps

def step_checkpoint(s: Setup) -> None:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (s.model / "config.json").is_file() and s.calib.is_file():
        print(f"{s.model} exists: kept")
        return
    shutil.rmtree(s.model, ignore_errors=True)
    config = LlamaConfig(**s.shape, tie_word_embeddings=False, max_position_embeddings=max(8192, s.seq_len),
                         rope_theta=500000.0, bos_token_id=0, eos_token_id=1)
    start = time.perf_counter()
    with torch.device(s.device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, s.dtype))
    sync(s.device)
    generated = time.perf_counter() - start
    start = time.perf_counter()
    model.save_pretrained(s.model, max_shard_size="5GB")
    written = time.perf_counter() - start
    ids = np.random.default_rng(0).integers(2, s.shape["vocab_size"], size=(s.samples, s.seq_len), dtype=np.int64)
    np.save(s.calib, ids)
    size = sum(f.stat().st_size for f in s.model.glob("*.safetensors"))
    s.write("checkpoint", [{"shape": "Llama-3.1-8B" if s.shape is LLAMA_8B else "tiny", "dtype": s.dtype,
                            "gib": round(size / 2**30, 2), "generate_s": round(generated, 2),
                            "write_s": round(written, 2)}])


def prune_args(s: Setup) -> dict:
    """Every prune's arguments, by `compact prune`'s flag names (target_params: --target-params): the defaults
    but the target, with the setup's calibration, device and dtype."""
    return {"target_params": 0.65, "calib": str(s.calib), "samples": s.samples, "seq_len": s.seq_len,
            "device": s.device, "dtype": s.dtype}


def gpu_cap(s: Setup) -> tuple[float, float] | None:
    """layerwise's GPU memory cap, (fraction of the GPU's memory, GiB): less than the model's weights, so that it
    can only run one layer at a time (None on the CPU)."""
    import torch

    if not s.device.startswith("cuda"):
        return None
    total = torch.cuda.get_device_properties(0).total_memory
    cap = min(0.5 * sum(f.stat().st_size for f in s.model.glob("*.safetensors")), 0.9 * total)
    return cap / total, cap / 2**30


def _prune(s: Setup, out: Path, offload: bool) -> tuple[dict, float]:
    """(report, load seconds) of `compact prune` with prune_args, in this process."""
    from compact import loading, pruning
    from compact.options import CalibOptions, Method, Run

    a = prune_args(s)
    start = time.perf_counter()
    load = loading.load_skeleton if offload else loading.load
    loaded = load(str(s.model), dtype=a["dtype"], device=a["device"])
    sync(s.device)
    load_s = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    report = pruning.prune(loaded, out, Method(target_params=a["target_params"]),
                            CalibOptions(a["calib"], a["samples"], a["seq_len"]), Run(progress=False))
    return report, load_s


def step_prune(s: Setup) -> None:
    report, load_s = _prune(s, s.pruned, offload=False)
    phases = {k: v for k, v in report["timings_s"].items() if k != "loading"}  # load_s times it here, synced
    rows = [{"phase": "load (first read of the weights)", "seconds": round(load_s, 2)}]
    rows += [{"phase": name, "seconds": round(sec, 2)} for name, sec in phases.items()]
    total = sum(sec for name, sec in phases.items() if not name.startswith("scoring: "))  # parts of "scoring"
    rows.append({"phase": "end to end, load excluded", "seconds": round(total, 2), "paper_s": PAPER["prune_8b_s"],
                 "peak_gib": peak_gib(s.device), "refit": report["options"]["refit"],
                 "kept": f"{report['sizes']['vocab_after']} rows, {report['sizes']['intermediate_after']} channels"})
    s.write("prune", rows)


def step_layerwise(s: Setup) -> None:
    import torch

    cap = gpu_cap(s)
    if cap is not None:
        torch.cuda.set_per_process_memory_fraction(cap[0])
    report, load_s = _prune(s, s.work / "pruned-layerwise", offload=True)
    shutil.rmtree(s.work / "pruned-layerwise")  # (~10 GB at the 8B shape; the in-memory prune's copy serves speed)
    phases = {k: v for k, v in report["timings_s"].items() if k != "loading"}  # load_s times it here, synced
    layers = s.shape["num_hidden_layers"]
    per_layer = phases.get("scoring", 0.0) / layers
    scale = layer_params(LLAMA_70B) / layer_params(s.shape)
    rest = sum(sec for name, sec in phases.items() if not name.startswith("scoring")) 
    estimate = per_layer * scale * LLAMA_70B["num_hidden_layers"] + rest * 70 / 8
    s.write("layerwise", [{"gpu_cap_gib": None if cap is None else round(cap[1], 1),
                           "load_s": round(load_s, 2), **{k: round(v, 2) for k, v in phases.items()},
                           "per_layer_s": round(per_layer, 3), "layer_scale_to_70b": round(scale, 2),
                           "estimated_70b_s": round(estimate, 1), "paper_70b_s": PAPER["prune_70b_s"],
                           "peak_gib": peak_gib(s.device)}])


def step_speed(s: Setup) -> None:
    import gc

    import numpy as np
    import torch

    from compact import evaluate, loading

    rows = []
    ids = torch.from_numpy(np.load(s.calib)[:1])
    for name, folder in (("original", s.model), ("pruned 0.65", s.pruned)):
        loaded = loading.load(str(folder), dtype=s.dtype, device=s.device)
        vocab = loaded.model.get_input_embeddings().num_embeddings
        if s.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        speed = evaluate.speed(loaded.model, ids % vocab, new_tokens=32, repeats=5)
        rows.append({"model": name, "weight_gib": round(evaluate.weight_bytes(loaded.model) / 2**30, 3),
                     "prefill_tokens_per_s": round(speed["prefill_tokens_per_s"], 1),
                     "decode_tokens_per_s": round(speed["decode_tokens_per_s"], 1), "peak_gib": peak_gib(s.device)})
        del loaded
        gc.collect()
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
    orig, pruned = rows
    rows.append({"model": "pruned / original", "weight_gib": round(pruned["weight_gib"] / orig["weight_gib"], 3),
                 "prefill_tokens_per_s": round(pruned["prefill_tokens_per_s"] / orig["prefill_tokens_per_s"], 3),
                 "decode_tokens_per_s": round(pruned["decode_tokens_per_s"] / orig["decode_tokens_per_s"], 3),
                 "paper": f"{PAPER['memory']}x memory, {PAPER['throughput']}x throughput"})
    s.write("speed", rows)


def matrix_tflops(device: str, dtype) -> float:
    """The rate of a plain square matrix product in `dtype` (8192^3 on a GPU, 512^3 on a CPU), TFLOP/s."""
    import torch

    n = 8192 if device.startswith("cuda") else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    if device.startswith("cuda"):
        import triton.testing

        ms = triton.testing.do_bench(lambda: a @ b)
    else:
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        ms = (time.perf_counter() - start) / 5 * 1e3
    return 2 * n**3 / (ms * 1e-3) / 1e12


def step_utilisation(s: Setup) -> None:
    import numpy as np
    import torch

    from compact import loading, models
    from compact.scoring import score_channels

    loaded = loading.load(str(s.model), dtype=s.dtype, device=s.device)
    model, dtype = loaded.model, loaded.dtype
    ids = torch.from_numpy(np.load(s.calib)).to(s.device)
    rate = matrix_tflops(s.device, dtype)
    flop = decoder_flop_per_token(s.shape, s.seq_len) * ids.numel()

    def timed(batch_size: int) -> tuple[float, dict]:
        score_channels(model, ids[:batch_size], batch_size=batch_size, progress=False)  # warm-up
        sync(s.device)
        start = time.perf_counter()
        scores = score_channels(model, ids, batch_size=batch_size, progress=False)
        sync(s.device)
        return time.perf_counter() - start, scores

    rows, eager = [], None
    for batch_size in (1, 4) if s.quick else (1, 4, 16):
        if batch_size > ids.shape[0]:
            continue
        seconds, scores = timed(batch_size)
        eager = eager or scores
        rows.append({"variant": f"eager, batch {batch_size}", "seconds": round(seconds, 3),
                     "tflops": round(flop / seconds / 1e12, 1), "matrix_tflops": round(rate, 1),
                     "mfu_of_matrix_rate": round(flop / seconds / 1e12 / rate, 3)})
    if not s.quick:
        backend = "inductor" if s.device.startswith("cuda") else "eager"  # --dry: dynamo only, no C++ build
        try:
            for layer in models.decoder_of(model).layers:
                layer.self_attn.compile(backend=backend)
            seconds, scores = timed(4 if ids.shape[0] >= 4 else 1)
            diff = max(float(((scores[k] - eager[k]).abs() / eager[k].abs().max()).max()) for k in eager)
            rows.append({"variant": f"torch.compile({backend}) of attention, batch 4", "seconds": round(seconds, 3),
                         "tflops": round(flop / seconds / 1e12, 1), "matrix_tflops": round(rate, 1),
                         "mfu_of_matrix_rate": round(flop / seconds / 1e12 / rate, 3),
                         "max_score_diff_vs_eager": f"{diff:.3g}"})
        except Exception as e:  # noqa: BLE001 - a compiler failure is a figure to report, not a crash
            rows.append({"variant": f"torch.compile({backend}) of attention", "error": f"{type(e).__name__}: {e}"[:300]})
    for r in rows:
        r["flop_per_token"] = f"{decoder_flop_per_token(s.shape, s.seq_len):.4g}"
    s.write("utilisation", rows)


# torchrun's worker: `compact` under a GPU memory cap (argv[1]: the fraction of the GPU, or "none")
_WORKER = """import sys
cap = sys.argv.pop(1)
if cap != "none":
    import torch
    torch.cuda.set_per_process_memory_fraction(float(cap))
from compact.cli import run
run()
"""


def _torchrun_prune(s: Setup, out: Path, flags: list[str], cap: tuple[float, float] | None) -> dict:
    """`compact prune MODEL` with prune_args and `flags` under `torchrun --nproc-per-node 1` into `out` (then
    removed): rc, seconds, the written tensors finite, the report's re-fit, OUT.ckpt seen while it ran and gone."""
    from safetensors import safe_open

    ckpt = Path(f"{out}.ckpt")
    for path in (out, ckpt):
        shutil.rmtree(path, ignore_errors=True)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in prune_args(s).items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "--no-python",
               sys.executable, "-c", _WORKER, "none" if cap is None else repr(cap[0]), "prune", str(s.model), *args,
               *flags, "--out", str(out), "--quiet"]
    print(" ".join(command).replace(_WORKER, "WORKER"), flush=True)
    log = s.work / f"{out.name}.log"
    seen = False
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        while proc.poll() is None:
            seen = seen or (ckpt.is_dir() and any(ckpt.iterdir()))
            time.sleep(0.01)
    seconds = time.perf_counter() - start
    print(log.read_text()[-3000:], flush=True)
    files = sorted(out.glob("*.safetensors")) if proc.returncode == 0 else []
    finite = bool(files)
    for file in files:  # tensor by tensor: the 8B shape's ~10 GB never whole in memory
        with safe_open(str(file), "pt") as st:
            names = st.keys()  # (a safe_open, not a dict)
            finite = finite and all(bool(st.get_tensor(k).to(s.device).isfinite().all()) for k in names)
    report = out / "compact_report.json"
    refit = json.loads(report.read_text())["options"]["refit"] if report.is_file() else None
    gone = not ckpt.exists()
    shutil.rmtree(out, ignore_errors=True)  # (~10 GB at the 8B shape)
    return {"rc": proc.returncode, "seconds": round(seconds, 2), "tensors_finite": finite, "refit": refit,
            "ckpt_seen": seen, "ckpt_removed": gone}


def step_torchrun(s: Setup) -> None:
    every = 8 if s.shape["num_hidden_layers"] > 8 else 1
    cap = gpu_cap(s)
    rows = []
    for mode, name, flags, run_cap in (("in memory", "torchrun-prune", [], None),
                                       (f"--offload layerwise --checkpoint-every {every}", "torchrun-layerwise",
                                        ["--offload", "layerwise", "--checkpoint-every", str(every)], cap)):
        rows.append({"processes": 1, "backend": "nccl" if s.device.startswith("cuda") else "gloo", "mode": mode,
                     "gpu_cap_gib": None if run_cap is None else round(run_cap[1], 1),
                     **_torchrun_prune(s, s.work / name, flags, run_cap)})
    s.write("torchrun", rows)
    bad = [r for r in rows if r["rc"] != 0 or not r["tensors_finite"] or r["refit"] != "sequential"
           or not r["ckpt_removed"] or (r["mode"] != "in memory" and not r["ckpt_seen"])]
    if bad:
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------- driver

def run_steps(args) -> int:
    """Every step in its own process under its own limit (--dry: in this one, unlimited); the log and the step
    table under --out."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    log = (out / "gpu_product.log").open("w")
    summary, failed = [], False
    flags = ["--out", str(out), "--work", str(args.work)] + ["--dry"] * args.dry + ["--quick"] * args.quick
    for name, (limit, quick_skips) in STEPS.items():
        if (args.quick and quick_skips) or name in args.skip:
            summary.append({"step": name, "rc": "skipped", "seconds": 0, "limit_s": limit})
            continue
        start = time.perf_counter()
        print(f"== {name} (limit {limit} s)", file=log, flush=True)
        rc = (_in_process if args.dry else _in_subprocess)([*flags, "--step", name], limit, log)
        failed |= rc != 0
        summary.append({"step": name, "rc": rc, "seconds": round(time.perf_counter() - start, 1), "limit_s": limit})
        print(f"{name:<12} rc={rc!s:<8} {summary[-1]['seconds']:>6} s (limit {limit} s)", flush=True)
    log.close()
    with (out / "gpu_product_steps.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    print((out / "gpu_product.log").read_text()[-6000:] if failed else f"results in {out}")
    return 1 if failed else 0


def _in_subprocess(argv: list[str], limit: int, log) -> int | str:
    try:
        return subprocess.run([sys.executable, __file__, *argv], stdout=log, stderr=subprocess.STDOUT, timeout=limit,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    except subprocess.TimeoutExpired:
        return "timeout"


def _in_process(argv: list[str], limit: int, log) -> int:
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return main(argv)
        except Exception:  # noqa: BLE001 - reported like a failed subprocess: in the log, rc 1
            traceback.print_exc()
            return 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry", action="store_true", help="a tiny model on the CPU: proves every step in seconds")
    p.add_argument("--quick", action="store_true", help="skip layerwise, torchrun and the compiled variant")
    p.add_argument("--skip", nargs="+", choices=list(STEPS), default=[], metavar="STEP", help="steps not to run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="CSVs and the log")
    p.add_argument("--work", default="/tmp/compact-gpu-product", help="checkpoints (~16 GB + ~10 GB on a GPU)")
    p.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step is None:
        if not args.dry:
            import torch

            if not torch.cuda.is_available():
                print("bench/gpu_product.py: needs a CUDA GPU (or --dry); nothing measured")
                return 0
        return run_steps(args)
    setup = Setup.of(args)
    print(json.dumps({k: str(v) for k, v in asdict(setup).items()}))
    globals()[f"step_{args.step}"](setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
