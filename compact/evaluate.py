"""Evaluation: held-out negative log-likelihood / perplexity, parameter counts, optional tokens/s."""
from __future__ import annotations

import math
import time

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


@torch.inference_mode()
def tokens_per_second(model, input_ids: torch.Tensor, repeats: int = 3) -> float:
    """Prefill throughput: best of `repeats` forwards over the first sequence."""
    device = model.get_input_embeddings().weight.device
    ids = input_ids[:1].to(device)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def evaluate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, batch_size: int = 1,
             speed: bool = False, progress: bool | None = None) -> dict:
    """NLL per token, perplexity, parameter counts and (with `speed`) prefill tokens/s."""
    total, count = nll(model, input_ids, attention_mask, batch_size=batch_size, progress=progress)
    if count == 0:
        raise ValueError("evaluation data has no predicted tokens (sequences of length 1?)")
    result = {"tokens": count, "nll_per_token": total / count, "perplexity": math.exp(total / count),
              "parameters": models.parameter_counts(model)}
    if speed:
        result["prefill_tokens_per_s"] = tokens_per_second(model, input_ids)
    return result
