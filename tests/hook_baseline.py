"""The hook-based scoring users write without this package: the reference of tests/test_perf.py and the baseline
that bench/calibration.py times (it imports this file, so both measure the same code)."""
from __future__ import annotations

import torch


def hook_scores(model, ids, mask, table, batch_size: int) -> dict[str, torch.Tensor]:
    """Full model(...) forwards under no_grad with a forward pre-hook on every down_proj that adds
    (h.float()**2 * w[..., None]).sum((0, 1)), w = table[ids] * mask, into a float64 total per layer."""
    layers = model.model.layers
    totals = {f"model.layers.{i}.mlp": torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64,
                                                   device=ids.device) for i, layer in enumerate(layers)}
    state = {}

    def hook_for(name):
        def hook(module, args):
            h = args[0]
            totals[name] += (h.float() ** 2 * state["w"][..., None]).sum((0, 1))
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook_for(f"model.layers.{i}.mlp"))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                x, m = ids[start:start + batch_size], mask[start:start + batch_size]
                state["w"] = table[x] * m
                model(input_ids=x, attention_mask=m)
    finally:
        for handle in handles:
            handle.remove()
    return totals
