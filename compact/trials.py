"""Measured planning for --target-params: the planner's price is a sum of two shares in different units (tokens
dropped, act^2 left), so its best-priced splits are pruned for real, in memory, each with the prune's own
calibration pass, selection and re-fit, and measured on calibration rows held out from the fit (the rows after
--samples), in the measure's own units: bits per byte of that text as each split's cut tokenizer reads it, as
`compact eval` counts them. The best measured split wins; its pass is kept, so pruning it costs nothing more.
Here: which splits are measured, the measure, the choice; the pipeline runs each split's pass.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch

from . import data, evaluate, repair, slicing, tokenizer


def held_rows(samples: int) -> int:
    """Calibration rows held out for measuring: a quarter of --samples, at least 2."""
    return max(2, samples // 4)


def wanted(job) -> bool:
    """Measured planning applies: --target-params with trials, a data-driven pass on resident layers, a
    tokenizer to read the held-out text with."""
    method, loaded = job.method, job.loaded
    return (method.target_params is not None and method.plan_trials > 0 and job.data_scores
            and not loaded.offloaded and loaded.tokenizer is not None)


def split_rows(calib: data.Calibration, samples: int) -> tuple[data.Calibration, data.Calibration | None]:
    """(the first `samples` rows, the rows after them or None when the data has no more)."""
    mask = calib.attention_mask
    fit = data.Calibration(calib.input_ids[:samples], None if mask is None else mask[:samples], calib.source)
    if calib.input_ids.shape[0] <= samples:
        return fit, None
    rows = calib.input_ids.shape[0] - samples
    held = data.Calibration(calib.input_ids[samples:], None if mask is None else mask[samples:],
                            f"{rows} calibration rows after the {samples} fitted")
    return fit, held


@dataclass(frozen=True)
class Trial:
    """One best-priced split pruned in memory and read on the held-out rows: its sizes, the planner's price and
    the bits per byte measured; `chosen`: the least (the plan's choice)."""

    vocab_keep: int
    ffn_keep: int
    cost: float
    bits_per_byte: float
    chosen: bool = False


def shortlist(candidates: list, n: int) -> list:
    """The `n` best-priced candidates, cheapest first (ties: the larger FFN), the splits to measure."""
    return sorted(candidates, key=lambda c: (c.cost, -c.ffn_keep))[:n]


def choose(measured: list[Trial]) -> tuple[Trial, ...]:
    """The trials with the least bits per byte (ties: the cheaper) marked chosen."""
    best = min(measured, key=lambda t: (t.bits_per_byte, t.cost))
    return tuple(replace(t, chosen=t is best) for t in measured)


def held_out_bits_per_byte(loaded, held: data.Calibration, *, kept_ids: list[int] | None, kept_channels,
                           refits) -> float:
    """Bits per byte of the held-out rows' text for the model pruned to `kept_ids` and `kept_channels` (None:
    not cut), `refits` applied first (a copy, in memory), the text re-read by the tokenizer cut to `kept_ids`."""
    model = copy.deepcopy(loaded.model)
    if refits:
        repair.apply_refits(model, kept_channels, refits)
    slicing.slice_model(model, kept_ids, kept_channels or None)
    cut = loaded.tokenizer if kept_ids is None else tokenizer.prune_tokenizer(loaded.tokenizer, kept_ids)
    context = getattr(model.config, "max_position_embeddings", None) or held.input_ids.shape[1]
    ids, mask = _reread(loaded.tokenizer, cut, held, context)
    total, _ = evaluate.nll(model, ids, mask, batch_size=1, progress=False)
    del model
    return total / math.log(2) / max(evaluate.text_bytes(cut, ids, mask), 1)


def _reread(original, cut, held: data.Calibration, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out rows decoded by the original tokenizer and encoded by the cut one (at most `limit` tokens),
    right-padded."""
    rows = []
    for i, row in enumerate(held.input_ids):
        valid = row if held.attention_mask is None else row[held.attention_mask[i].bool()]
        text = original.decode(valid.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        rows.append(cut(text)["input_ids"][:limit])
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
    return ids, mask

