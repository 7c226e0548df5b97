"""The layer-major calibration engine: every calibration batch passes layer l before any passes layer l+1.

The decoder's own forward runs once per batch with its layers replaced by stubs that record what each layer
receives (layer-0 hidden states, masks, rotary tables, positions); then each layer in turn runs every batch.
A `LayerSource` hands the layers out: `Resident` (the model in memory) or `compact.layerwise.Shards` (one
layer at a time from the checkpoint files, `--offload layerwise`): the same loop either way, so every option
works in both modes and both give the same numbers. Per layer:

1. the unpruned stream: `ChannelScorer` accumulates common act^2 (and plain act^2, and for the same-input
   re-fit the Gram matrix of down_proj's input); its outputs are the next layer's inputs and the targets;
2. `sequential` re-fit only, the pruned stream (layers below already pruned and re-fitted) runs the layer
   with the MLP silenced: the layer's output is then the residual the MLP adds to, out'. The target of the
   pruned MLP is y - out' (y: the unpruned layer's output), or the unpruned MLP's own output for families
   that normalize the MLP output (Gemma 2/3); the Gram G' of its activations h' and their cross term C with
   the target are accumulated;
3. `choose(stats)` picks the kept channels from the layer's statistics (top-K of the scores, or the re-fit-
   aware elimination of compact.repair);
4. the kept down_proj columns are re-fitted (compact.repair); `sequential`: the pruned stream runs the
   pruned layer, giving the next layer's pruned-stream inputs.

Statistics live for one layer at a time: I^2 + D*I float64 numbers at most (1.64 GB + 0.47 GB for
Llama-3.1-8B), never L x I^2. The streams cost T x D each in the model dtype (T calibration tokens). The
sequential re-fit runs each layer three times per batch instead of once (pass 1, 2 and 4) and adds
2 T I^2 + 2 T D I FLOP per layer for G' and C.
"""
from __future__ import annotations

import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import compact_kernels as ck

from . import models, repair
from .memory import trim_host_memory
from .options import REFITS
from .progress import bar as progress_bar
from .scoring import ChannelScorer, ScoringOptions


# ------------------------------------------------------------------------------------------- recording

class _Recorder(nn.Module):
    """Stands in for decoder layer i: records what the decoder passes it, returns its input unchanged."""

    def __init__(self, index: int, sink: dict):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states, *args, **kwargs):
        self.sink[self.index] = (args, kwargs)
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        return hidden_states


def _record_inputs(decoder: nn.Module, input_ids, attention_mask) -> tuple[torch.Tensor, list]:
    """(layer-0 hidden states, [(args, kwargs) per layer]) from the decoder's own forward with stub layers."""
    sink: dict = {}
    layers, norm = decoder.layers, getattr(decoder, "norm", None)
    decoder.layers = nn.ModuleList(_Recorder(i, sink) for i in range(len(layers)))
    if norm is not None:
        decoder.norm = nn.Identity()
    try:
        decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        decoder.layers = layers
        if norm is not None:
            decoder.norm = norm
    return sink["hidden"], [sink[i] for i in range(len(layers))]


@dataclass
class Batch:
    """One calibration batch in flight: its ids and mask (on the compute device), the unpruned stream's
    hidden states, the pruned stream's (sequential re-fit only) and each layer's recorded arguments."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    hidden: torch.Tensor
    per_layer: list
    shifted: torch.Tensor | None = None

    def run(self, layer: nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.per_layer[i]
        out = layer(hidden.to(self.ids.device), *args, **kwargs)
        return (out[0] if isinstance(out, tuple) else out).to(hidden.device)


def record_batches(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   batch_size: int, device: torch.device, hidden_device: torch.device) -> list[Batch]:
    """Every batch's layer-0 hidden states (on `hidden_device`) and per-layer arguments."""
    batches = []
    with torch.inference_mode():
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start:start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
            hidden, per_layer = _record_inputs(decoder, ids, mask)
            batches.append(Batch(ids, mask, hidden.to(hidden_device), per_layer))
    return batches


# ------------------------------------------------------------------------------------------- sources

class Resident:
    """The layers of a model held in memory."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = model.get_input_embeddings().weight.device

    @contextmanager
    def embedded(self) -> Iterator[None]:
        yield

    def record(self, input_ids, attention_mask, batch_size: int) -> list[Batch]:
        return record_batches(models.decoder_of(self.model), input_ids, attention_mask, batch_size, self.device,
                              self.device)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        yield models.decoder_of(self.model).layers[i]


# ------------------------------------------------------------------------------------------- the loop

@dataclass
class EngineOptions:
    """What the engine computes beside the scores: `plain` act^2, the `gram` of the unpruned stream (for the
    planner's pricing), and the re-fit of the kept channels (`refit` one of REFITS, with `ridge`)."""

    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    plain: bool = False
    gram: bool = False
    refit: str = "none"
    ridge: float = repair.RIDGE


@dataclass
class LayerStats:
    """One layer's statistics, handed to `choose`: its MLP (weights present), common act^2 `scores`, `plain`
    act^2, the same-input Gram, and the sequential re-fit's pruned-stream Gram and cross term."""

    name: str
    mlp: nn.Module
    scores: torch.Tensor
    plain: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    shifted_gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None

    def fit(self, kept: list[int], ridge: float) -> torch.Tensor | None:
        """The re-fitted kept down_proj columns (float64 [D, K]); None without the statistics for one."""
        weight = self.mlp.down_proj.weight.detach()
        index = torch.as_tensor(kept, dtype=torch.long, device=weight.device)
        if self.cross is not None:
            return repair.refit_to(weight, self.cross, self.shifted_gram, index, ridge)
        if self.gram is not None:
            return repair.refit(weight, self.gram, index, ridge)
        return None


@dataclass
class Outcome:
    """What a run found: scores (and plain act^2) per MLP, the kept channels and their re-fitted down_proj
    columns ([D, K] in the model dtype, on the CPU) where `choose` cut the layer."""

    scores: dict[str, torch.Tensor]
    plain: dict[str, torch.Tensor] | None
    kept: dict[str, list[int]] = field(default_factory=dict)
    refits: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=lambda: {"choice": 0.0, "re-fit": 0.0})  # inside the pass


def run(source, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: EngineOptions,
        choose: Callable[[LayerStats], list[int] | None] | None = None) -> Outcome:
    """Run the calibration batches through `source`'s layers, layer by layer (see the module docstring)."""
    if options.refit not in REFITS:
        raise ValueError(f"refit must be one of {', '.join(REFITS)}, got {options.refit!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [sequences, length], got shape {tuple(input_ids.shape)}")
    scoring = options.scoring
    if scoring.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {scoring.batch_size}")
    model = source.model
    with source.embedded():  # the scorer's tables and sums live where the embedding does
        scorer = ChannelScorer(model, keep_token_ids=scoring.keep_token_ids, token_weights=scoring.token_weights,
                               path=scoring.path, plain=options.plain,
                               gram=options.gram or options.refit == "same-input")
        batches = source.record(input_ids, attention_mask, scoring.batch_size)
    sequential = options.refit == "sequential"
    for batch in batches if sequential else ():
        batch.shifted = batch.hidden
    outcome = Outcome(scorer.scores, scorer.plain_scores)
    mlps = models.mlps(model)
    post_normed = sequential and _post_normed(model)
    glu = _glu(model)
    with torch.inference_mode():
        for i, name in enumerate(progress_bar(mlps, desc="layers", unit="layer", progress=scoring.progress)):
            with source.layer(i) as layer:
                stats = _layer(scorer, layer, name, batches, i, (glu, post_normed))
                start = time.perf_counter()
                kept = choose(stats) if choose is not None else None
                chosen = time.perf_counter()
                fitted = stats.fit(kept, options.ridge) if kept is not None and options.refit != "none" else None
                if kept is not None:
                    outcome.kept[name] = kept
                if fitted is not None:
                    outcome.refits[name] = fitted.to(layer.mlp.down_proj.weight.dtype).cpu()  # (a device sync)
                outcome.seconds["choice"] += chosen - start
                outcome.seconds["re-fit"] += time.perf_counter() - chosen
                if sequential:
                    _advance(layer, batches, i, glu, (kept, fitted))
            del stats, fitted
            trim_host_memory()  # the layer's statistics go back to the system before the next layer's
    return outcome


def _layer(scorer: ChannelScorer, layer: nn.Module, name: str, batches: list[Batch], i: int,
           mlp_kind: tuple) -> LayerStats:
    """Passes 1 and 2 over layer i: the unpruned stream scored and advanced, the pruned stream's statistics.
    `mlp_kind`: (the activations function, whether the family normalizes the MLP output)."""
    glu, post_normed = mlp_kind
    mlp = layer.mlp
    outputs: list[torch.Tensor] = []
    tap = mlp.register_forward_hook(lambda m, a, out: outputs.append(out)) if post_normed else None
    try:
        with scorer.driven():
            for batch in batches:
                scorer.set_batch(batch.ids, batch.mask)
                batch.hidden = batch.run(layer, i, batch.hidden)
    finally:
        if tap is not None:
            tap.remove()
    stats = LayerStats(name, mlp, scorer.scores[name],
                       None if scorer.plain_scores is None else scorer.plain_scores[name],
                       None if scorer.grams is None else scorer.grams.pop(name))
    if batches and batches[0].shifted is not None:
        stats.shifted_gram, stats.cross = _shifted_stats(scorer, layer, (batches, i), glu, outputs or None)
    return stats


def _shifted_stats(scorer: ChannelScorer, layer: nn.Module, where: tuple[list[Batch], int], glu,
                   mlp_outputs: list | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G' = sum_t w_t h'_t h'_t^T, C = sum_t w_t r_t h'_t^T) over the pruned stream, float64: h' down_proj's
    input there, r the target of the pruned MLP's output (module docstring). `where`: (batches, layer index)."""
    (batches, i), mlp = where, layer.mlp
    down = mlp.down_proj
    gram = torch.zeros(down.in_features, down.in_features, dtype=torch.float64, device=down.weight.device)
    cross = torch.zeros(down.out_features, down.in_features, dtype=torch.float64, device=down.weight.device)
    seen: list[torch.Tensor] = []

    def silenced(module, x):
        h = glu(module, x)
        seen.append(h)
        return torch.zeros(*h.shape[:-1], down.out_features, dtype=h.dtype, device=h.device)

    with _forward(mlp, silenced):
        for b, batch in enumerate(batches):
            residual = batch.run(layer, i, batch.shifted)
            h = seen.pop().reshape(-1, down.in_features).float()
            target = batch.hidden - residual if mlp_outputs is None else mlp_outputs[b]
            target = target.to(h.device).reshape(-1, down.out_features).float()
            if down.bias is not None:
                target = target - down.bias.float()
            weights = scorer.weights_for(batch.ids, batch.mask)
            weighted = h if weights is None else h * weights.reshape(-1, 1)
            gram.add_(weighted.T @ h)  # float32 products, summed across batches in float64
            cross.add_(target.T @ weighted)
    return gram, cross


def _advance(layer: nn.Module, batches: list[Batch], i: int, glu, cut: tuple) -> None:
    """The pruned stream through the pruned layer i: down_proj reads the kept channels with the re-fitted
    columns (the original layer when nothing is cut). `cut`: (kept channels or None, re-fitted columns or None)."""
    kept, fitted = cut
    if kept is None:
        for batch in batches:
            batch.shifted = batch.run(layer, i, batch.shifted)
        return
    down = layer.mlp.down_proj
    index = torch.as_tensor(kept, dtype=torch.long, device=down.weight.device)
    weight = (fitted if fitted is not None else down.weight.detach()[:, index]).to(down.weight)

    def pruned(module, x):
        return F.linear(glu(module, x).index_select(-1, index), weight, down.bias)

    with _forward(layer.mlp, pruned):
        for batch in batches:
            batch.shifted = batch.run(layer, i, batch.shifted)


def _glu(model: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """mlp, x -> h = act(gate(x)) * up(x), the input of down_proj, as the model computes it."""
    family, activation = models.family_of(model.config), models.activation_of(model.config)

    def activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = family.gate_up(mlp, x)
        return ck.glu_and_score(gate, up, activation=activation)

    return activations


def _post_normed(model: nn.Module) -> bool:
    """Whether the family normalizes the MLP output before the residual add (Gemma 2/3)."""
    return hasattr(models.decoder_of(model).layers[0], "post_feedforward_layernorm")


@contextmanager
def _forward(mlp: nn.Module, forward):
    """mlp.forward replaced by `forward(mlp, x)` inside the block, restored after."""
    saved = mlp.__dict__.get("forward")
    mlp.forward = types.MethodType(forward, mlp)
    try:
        yield
    finally:
        if saved is None:
            del mlp.forward
        else:
            mlp.forward = saved

