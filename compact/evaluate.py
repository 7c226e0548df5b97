"""Evaluation: held-out negative log-likelihood / perplexity, parameter counts, memory, optional tokens/s."""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F

from . import data, memory, models
from .progress import bar as progress_bar


@torch.inference_mode()
def nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, batch_size: int = 1,
        progress: bool | None = None) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens) over all sequences."""
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    for start in progress_bar(range(0, input_ids.shape[0], batch_size), desc="evaluating", unit="batch",
                               progress=progress):
        ids = input_ids[start:start + batch_size].to(device)
        mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        # [positions, V]: the softmax over a contiguous last dimension (a transposed [B, V, T] input is ~8x slower)
        targets = ids[:, 1:]
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
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


def text_bytes(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """UTF-8 bytes of the text behind the predicted tokens (each row after its first token)."""
    total = 0
    for i, row in enumerate(input_ids):
        keep = row[1:] if attention_mask is None else row[1:][attention_mask[i, 1:].bool()]
        text = tokenizer.decode(keep.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        total += len(text.encode("utf-8"))
    return total


def evaluate(model, calib: data.Calibration, *, tokenizer=None, batch_size: int = 1, measure_speed: bool = False,
             progress: bool | None = None) -> dict:
    """NLL per token over `calib`, perplexity, bits per byte (with a tokenizer: fair across vocabularies) or
    per token, parameter counts, weight bytes, the NLL pass's working memory and, with `measure_speed`,
    prefill/decode tokens/s."""
    input_ids, attention_mask = calib.input_ids, calib.attention_mask
    device = model.get_input_embeddings().weight.device
    with memory.work_memory(device) as used:
        total, count = nll(model, input_ids, attention_mask, batch_size=batch_size, progress=progress)
    if count == 0:
        raise ValueError("evaluation data has no predicted tokens (sequences of length 1?)")
    result = {"tokens": count, "nll_per_token": total / count, "perplexity": math.exp(total / count),
              "bits_per_token": total / count / math.log(2), "parameters": models.parameter_counts(model)}
    if tokenizer is not None:
        result["bytes"] = text_bytes(tokenizer, input_ids, attention_mask)
        result["bits_per_byte"] = total / math.log(2) / max(result["bytes"], 1)
    result.update(used, weight_bytes=weight_bytes(model))
    if measure_speed:
        result.update(speed(model, input_ids))
    return result
