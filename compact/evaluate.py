"""Evaluation: held-out negative log-likelihood / perplexity, parameter counts, memory, optional tokens/s."""
from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import models


@torch.inference_mode()
def nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, batch_size: int = 1,
        progress: bool | None = None) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens) over all sequences."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="evaluating", unit="batch",
                      disable=None if progress is None else not progress):
        ids = input_ids[start:start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        losses = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
        valid = torch.ones_like(losses) if mask is None else mask[:, 1:].float() * mask[:, :-1].float()
        total += float((losses * valid).sum(dtype=torch.float64))
        count += int(valid.sum())
    return total, count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def speed(model, input_ids: torch.Tensor, *, new_tokens: int = 32, repeats: int = 5) -> dict:
    """Prefill tokens/s (a forward over the first sequence) and decode tokens/s (greedy generation with the KV
    cache from a 16-token prompt): one untimed warm-up of each, then `repeats` timed runs; the median with
    the slowest and fastest run beside it."""
    device = model.get_input_embeddings().weight.device
    ids = input_ids[:1].to(device)
    prompt = ids[:, :16]

    def prefill():
        model(input_ids=ids, use_cache=False)

    def decode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    result = {"speed_repeats": repeats}
    for name, fn, tokens in (("prefill", prefill, ids.numel()), ("decode", decode, new_tokens)):
        fn()  # warm-up: allocator, caches and lazy initialisation stay out of the figures
        rates = sorted(tokens / _timed(device, fn) for _ in range(repeats))
        result[f"{name}_tokens_per_s"] = statistics.median(rates)
        result[f"{name}_tokens_per_s_range"] = (rates[0], rates[-1])
    return result


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (a tied matrix once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _status_bytes(key: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM) in bytes, or None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss (VmHWM), else since the process started (ru_maxrss)."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so that pages an earlier model freed but the
    process still holds do not hide this block's peak RSS; a no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def work_memory(device: torch.device):
    """Yields a dict that holds, on exit, `work_memory_bytes`: the peak memory of the block above what was in use
    when it began (the GPU allocator's peak on CUDA; peak RSS on a CPU, or None where the peak cannot be reset),
    so one model's figure does not include an earlier model's peak."""
    result = {"work_memory_kind": "GPU max_memory_allocated" if device.type == "cuda" else "peak RSS"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        _release_free_heap()
        base = rss_bytes() if reset_peak_rss() else None
    yield result
    if device.type == "cuda":
        result["work_memory_bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        result["work_memory_bytes"] = None if base is None else max(peak_rss_bytes() - base, 0)


def text_bytes(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """UTF-8 bytes of the text behind the predicted tokens (each row after its first token)."""
    total = 0
    for i, row in enumerate(input_ids):
        keep = row[1:] if attention_mask is None else row[1:][attention_mask[i, 1:].bool()]
        text = tokenizer.decode(keep.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        total += len(text.encode("utf-8"))
    return total


def evaluate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, tokenizer=None,
             batch_size: int = 1, measure_speed: bool = False, progress: bool | None = None) -> dict:
    """NLL per token, perplexity, bits per byte (with a tokenizer: fair across vocabularies) or per token,
    parameter counts, weight bytes, the NLL pass's working memory and, with `measure_speed`, prefill/decode
    tokens/s."""
    device = model.get_input_embeddings().weight.device
    with work_memory(device) as memory:
        total, count = nll(model, input_ids, attention_mask, batch_size=batch_size, progress=progress)
    if count == 0:
        raise ValueError("evaluation data has no predicted tokens (sequences of length 1?)")
    result = {"tokens": count, "nll_per_token": total / count, "perplexity": math.exp(total / count),
              "bits_per_token": total / count / math.log(2), "parameters": models.parameter_counts(model)}
    if tokenizer is not None:
        result["bytes"] = text_bytes(tokenizer, input_ids, attention_mask)
        result["bits_per_byte"] = total / math.log(2) / max(result["bytes"], 1)
    result.update(memory, weight_bytes=weight_bytes(model))
    if measure_speed:
        result.update(speed(model, input_ids))
    return result
