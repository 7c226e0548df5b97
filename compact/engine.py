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

`mlp` is `sequential` plus a reconstruction of the whole MLP: pass 2 also keeps, for this layer only, what
the MLP receives in the pruned stream (x'), the targets r and the token weights, per batch (2 T D float32
numbers on this rank); after the closed form, `repair.reconstruct` takes a few full-batch Adam steps on the
kept gate/up rows and down columns, stopped on the calibration rows held out by their index in the whole set
(every `repair.HOLD_OUT`th; so the split does not depend on the number of ranks), every rank stepping on the
all-reduced gradients; the pruned stream then advances through the reconstructed MLP (`repair.Refit` carries
the rows to the checkpoint and the cut).

Statistics live for one layer at a time: I^2 + D*I float64 numbers at most (1.64 GB + 0.47 GB for
Llama-3.1-8B), never L x I^2. The streams cost T x D each in the model dtype (T calibration tokens) and live
where they fit (compact.streams: device, host, or a disk memmap). The sequential re-fit runs each layer three
times per batch instead of once (pass 1, 2 and 4) and adds 2 T I^2 + 2 T D I FLOP per layer for G' and C.

Every mode is this loop (compact.runs): under torchrun each rank runs its share of the batches, the layer's
statistics are all-reduced after passes 1 and 2, rank 0 chooses and re-fits and broadcasts the result; with
checkpoints the state at a layer boundary (the sums so far, the choices and re-fits of the layers done, the
streams) is saved every few layers, and a resumed run continues from there with the same numbers.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import compact_kernels as ck

from . import models, repair, runs
from .memory import trim_host_memory
from .streams import Streams, place
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


@dataclass(frozen=True)
class Batch:
    """One calibration batch in flight: its ids and mask (on the compute device), its `rows` in the streams and
    each layer's recorded arguments."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    rows: slice
    per_layer: list

    def run(self, layer: nn.Module, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer i on `hidden` (moved to the compute device); its output there."""
        args, kwargs = self.per_layer[i]
        out = layer(hidden.to(self.ids.device), *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def record_batches(decoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                   batch_size: int, device: torch.device, streams: Streams) -> list[Batch]:
    """Every batch's per-layer arguments; its layer-0 hidden states into stream 0."""
    batches = []
    with torch.inference_mode():
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            ids = input_ids[rows].to(device)
            mask = None if attention_mask is None else attention_mask[rows].to(device)
            hidden, per_layer = _record_inputs(decoder, ids, mask)
            if hidden.dtype != streams.dtype:  # a stream in another dtype would round what the layers pass on
                raise RuntimeError(f"the decoder's hidden states are {hidden.dtype}, its weights "
                                   f"{streams.dtype}: load the model in one dtype")
            streams.put(0, rows, hidden)
            batches.append(Batch(ids, mask, slice(start, start + ids.shape[0]), per_layer))
    return batches


# ------------------------------------------------------------------------------------------- sources

class Resident:
    """The layers of a model held in memory."""

    reserve = 0  # device bytes the streams leave free beside the model (already resident)

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype

    @contextmanager
    def embedded(self) -> Iterator[None]:
        yield

    def record(self, input_ids, attention_mask, batch_size: int, streams: Streams) -> list[Batch]:
        return record_batches(models.decoder_of(self.model), input_ids, attention_mask, batch_size=batch_size,
                              device=self.device, streams=streams)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        yield models.decoder_of(self.model).layers[i]


# ------------------------------------------------------------------------------------------- the loop

@dataclass(frozen=True)
class EngineOptions:
    """What the engine computes beside the scores: `plain` act^2, the `gram` of the unpruned stream (for the
    planner's pricing), and the re-fit of the kept channels (`refit` one of REFITS, with `ridge`; `mlp` is the
    sequential re-fit followed by `repair.reconstruct` on the whole MLP);
    `host_memory`: bytes of host memory the streams may take (None: half the available; beyond: on disk)."""

    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    plain: bool = False
    gram: bool = False
    refit: str = "none"
    ridge: float = repair.RIDGE
    host_memory: int | None = None


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
    samples: repair.Samples | None = None  # --refit mlp: this rank's pruned-stream MLP inputs and targets

    def reduce(self, group: runs.Group) -> None:
        """Every statistic summed over torchrun's ranks, in place."""
        for value in (self.scores, self.plain, self.gram, self.shifted_gram, self.cross):
            group.all_reduce(value)

    def fit(self, kept: list[int], ridge: float) -> torch.Tensor | None:
        """The re-fitted kept down_proj columns (float64 [D, K]); None without the statistics for one."""
        weight = self.mlp.down_proj.weight.detach()
        index = torch.as_tensor(kept, dtype=torch.long, device=weight.device)
        if self.cross is not None:
            return repair.refit_to(weight, self.cross, self.shifted_gram, index, ridge)
        if self.gram is not None:
            return repair.refit(weight, self.gram, index, ridge)
        return None


@dataclass(frozen=True)
class Choice:
    """What `choose` made of one layer's statistics: the channels kept (None: the layer is not cut), the layer's
    scores by the caller's criterion, and `left`, the planner's curve of the error share a re-fit leaves."""

    kept: tuple[int, ...] | None = None
    scores: torch.Tensor | None = None
    left: torch.Tensor | None = None


@dataclass(frozen=True)
class Outcome:
    """What a run found: common act^2 `scores` (and `plain` act^2) per MLP, `choose`'s choice per MLP, the
    re-fit (`repair.Refit`: down_proj's kept columns, and with `mlp` gate/up's kept rows; the model dtype, on the
    CPU) where a layer was cut, the seconds the
    choices and the re-fits took inside the pass, where the streams lived, and the layer a resumed run
    continued from (0: it started afresh)."""

    scores: dict[str, torch.Tensor]
    plain: dict[str, torch.Tensor] | None
    choices: dict[str, Choice]
    refits: dict[str, repair.Refit]
    choice_seconds: float = 0.0
    refit_seconds: float = 0.0
    streams: str = ""
    resumed_from: int = 0

    @property
    def kept(self) -> dict[str, list[int]]:
        """The kept channels of each cut MLP."""
        return {name: list(c.kept) for name, c in self.choices.items() if c.kept is not None}


@dataclass
class _Pass:
    """A run's state at a layer boundary: what a checkpoint holds."""

    scorer: ChannelScorer
    choices: dict[str, Choice] = field(default_factory=dict)
    refits: dict[str, repair.Refit] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # choice, re-fit

    def state(self) -> dict[str, torch.Tensor]:
        """The sums, choices and re-fits as named tensors."""
        state = dict(self.scorer.sums.state_dict())
        for name, choice in self.choices.items():
            for key, value in (("kept", None if choice.kept is None else torch.tensor(choice.kept)),
                               ("criterion", choice.scores), ("left", choice.left)):
                if value is not None:
                    state[f"{key}/{name}"] = value.clone()  # a criterion may be a sum itself: saved apart
        for name, refit in self.refits.items():
            for key, value in (("refit", refit.down), ("refit-gate", refit.gate), ("refit-up", refit.up)):
                if value is not None:
                    state[f"{key}/{name}"] = value
        return state

    def restore(self, saved: runs.Saved, names: list[str]) -> None:
        """The state `state` saved, for the layers before `saved.next_layer`."""
        tensors = saved.tensors
        self.scorer.sums.load_state_dict(tensors)
        for name in names[:saved.next_layer]:
            kept = tensors.get(f"kept/{name}")
            self.choices[name] = Choice(None if kept is None else tuple(kept.tolist()),
                                        tensors.get(f"criterion/{name}"), tensors.get(f"left/{name}"))
            if f"refit/{name}" in tensors:
                self.refits[name] = repair.Refit(tensors[f"refit/{name}"], tensors.get(f"refit-gate/{name}"),
                                                 tensors.get(f"refit-up/{name}"))

    def outcome(self, streams: str, resumed_from: int) -> Outcome:
        return Outcome(self.scorer.scores, self.scorer.plain_scores, dict(self.choices), dict(self.refits),
                       *self.seconds, streams=streams, resumed_from=resumed_from)


def run(source, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, options: EngineOptions,
        choose: Callable[[LayerStats], Choice] | None = None, *, group: runs.Group | None = None,
        checkpoints: runs.Checkpoints | None = None) -> Outcome:
    """Run the calibration batches through `source`'s layers, layer by layer (see the module docstring): this
    rank's share of them under `group`, saving and resuming as `checkpoints` say."""
    group, checkpoints = group or runs.Group(), checkpoints or runs.Checkpoints()
    rows = _share(input_ids, options, group)
    if options.refit == "mlp" and input_ids.shape[0] < repair.HOLD_OUT:
        warnings.warn(f"--refit mlp holds out every {repair.HOLD_OUT}th calibration row to stop on; "
                      f"{input_ids.shape[0]} rows leave none: the sequential re-fit's closed form is kept "
                      f"(more --samples)", stacklevel=2)
    ids, mask = input_ids[rows], None if attention_mask is None else attention_mask[rows]
    model, scoring = source.model, options.scoring
    names = list(models.mlps(model))
    saved = runs.load(checkpoints, group)
    with source.embedded():  # the scorer's tables and sums live where the embedding does
        state = _Pass(ChannelScorer(model, keep_token_ids=scoring.keep_token_ids, token_weights=scoring.token_weights,
                                    path=scoring.path, plain=options.plain,
                                    gram=options.gram or options.refit == "same-input"))
        if saved is not None:
            state.restore(saved, names)
            if saved.next_layer == len(names):
                return state.outcome("", saved.next_layer)
        streams = _streams(source, ids, options, checkpoints)
        batches = source.record(ids, mask, scoring.batch_size, streams)
    try:
        start = 0 if saved is None else saved.next_layer
        if saved is not None:
            streams.load(saved.folder)
        elif streams.data[1:]:
            streams.copy(0, 1)  # the pruned stream starts where the unpruned one does
        _layers(source, state, options, choose, batches=batches, streams=streams, group=group,
                checkpoints=checkpoints, start=start, first_row=rows.start)
        return state.outcome(streams.describe(), start)
    finally:
        streams.close()


def _share(input_ids: torch.Tensor, options: EngineOptions, group: runs.Group) -> slice:
    """The rows this rank runs: whole batches, so that every batch is the batch one process would run."""
    if options.refit not in REFITS:
        raise ValueError(f"refit must be one of {', '.join(REFITS)}, got {options.refit!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [sequences, length], got shape {tuple(input_ids.shape)}")
    size = options.scoring.batch_size
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    batches = -(-input_ids.shape[0] // size)
    if batches < group.world:
        raise ValueError(f"{batches} calibration batches for {group.world} ranks: every rank needs at least one "
                         f"(more --samples, a smaller --batch-size, or fewer ranks)")
    share = group.share(batches)
    return slice(share.start * size, min(share.stop * size, input_ids.shape[0]))


def _streams(source, ids: torch.Tensor, options: EngineOptions, checkpoints: runs.Checkpoints) -> Streams:
    """The run's streams (two with the sequential re-fit), placed by their size."""
    count = 2 if options.refit in SEQUENTIAL else 1
    shape = (*ids.shape, source.model.config.hidden_size)
    nbytes = count * shape[0] * shape[1] * shape[2] * source.dtype.itemsize
    where = place(nbytes, source.device, reserve=source.reserve, host_limit=options.host_memory)
    folder = checkpoints.folder if checkpoints.folder is not None and where == "disk" else None
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    return Streams(shape, source.dtype, count, where=where, device=source.device, folder=folder)


def _layers(source, state: _Pass, options: EngineOptions, choose, *, batches: list[Batch], streams: Streams,
            group: runs.Group, checkpoints: runs.Checkpoints, start: int, first_row: int = 0) -> None:
    """Layers `start`.. in turn: statistics, reduced over the ranks; rank 0's choice and re-fit, broadcast (with
    `mlp`, the reconstruction on every rank's rows); the pruned stream advanced; a checkpoint every
    `checkpoints.every` layers and at the end. `first_row`: this rank's first calibration row in the whole set."""
    names = list(models.mlps(source.model))
    sequential, glu = options.refit in SEQUENTIAL, _glu(source.model)
    samples = first_row if options.refit == "mlp" else None
    post_normed = sequential and models.normalizes_mlp_output(source.model)
    bar = progress_bar(range(start, len(names)), desc=f"layers ({streams.describe()})", unit="layer",
                       initial=start, total=len(names), progress=options.scoring.progress)
    with torch.inference_mode():
        for i in bar:
            name = names[i]
            with source.layer(i) as layer:
                stats = _layer(state.scorer, layer, name, i, batches=batches, streams=streams, glu=glu,
                               post_normed=post_normed, samples=samples)
                stats.reduce(group)
                choice, refit = _decide(stats, choose, options, group, state, source.model)
                if sequential:
                    _advance(source.model, layer, i, batches=batches, streams=streams, glu=glu, choice=choice,
                             refit=refit)
            del stats, refit
            trim_host_memory()  # the layer's statistics go back to the system before the next layer's
            if checkpoints.saving and (i + 1) % checkpoints.every == 0 and i + 1 < len(names):
                runs.save(checkpoints, group, i + 1, state.state(), streams)
    if checkpoints.saving:
        runs.save(checkpoints, group, len(names), state.state())


def _decide(stats: LayerStats, choose, options: EngineOptions, group: runs.Group, state: _Pass,
            model: nn.Module) -> tuple[Choice | None, repair.Refit | None]:
    """(the layer's choice, its re-fit): rank 0's, broadcast to every rank (`mlp`: the closed form broadcast, then
    reconstructed by every rank together); recorded in `state`."""
    started = time.perf_counter()
    choice = choose(stats) if choose is not None and group.rank == 0 else None
    if group.world > 1:
        choice = group.broadcast(None if choice is None else _on_cpu(choice))
    chosen = time.perf_counter()
    fitted = None
    if choice is not None and choice.kept is not None and options.refit != "none":
        down = stats.mlp.down_proj.weight
        fitted = stats.fit(list(choice.kept), options.ridge) if group.rank == 0 else torch.empty(
            down.shape[0], len(choice.kept), dtype=torch.float64, device=down.device)
        group.broadcast_tensor(fitted)
    if choice is not None:
        state.choices[stats.name] = choice
    refit = None
    if fitted is not None:
        dtype = stats.mlp.down_proj.weight.dtype
        rebuilt = _reconstruct(model, stats, choice, fitted, group, options.ridge) if options.refit == "mlp" else None
        closed = repair.Refit(fitted.to(dtype).cpu())  # (a device sync)
        refit = closed if rebuilt is None else repair.Refit(
            rebuilt[2].to(dtype).cpu(), rebuilt[0].to(dtype).cpu(), rebuilt[1].to(dtype).cpu())
        refit = _finite(refit, closed, stats.mlp, model, choice.kept, stats.name)
        if refit is not None:
            state.refits[stats.name] = refit
    state.seconds[0] += chosen - started
    state.seconds[1] += time.perf_counter() - chosen
    return choice, refit


def _finite(refit: repair.Refit, closed: repair.Refit, mlp: nn.Module, model: nn.Module, kept: tuple[int, ...],
            name: str) -> repair.Refit | None:
    """The first finite of `refit`, the closed form `closed` and no re-fit (None: the kept weights as they are),
    with a warning when one was passed over: a NaN or inf among the dropped channels' weights, activations or
    targets would otherwise reach every kept column. ValueError when the kept weights themselves are not finite."""
    for candidate in (refit, closed):
        if all(bool(t.isfinite().all()) for t in (candidate.down, candidate.gate, candidate.up) if t is not None):
            if candidate is not refit:
                warnings.warn(f"{name}: the whole-MLP re-fit is not finite; the layer keeps the closed form",
                              stacklevel=3)
            return candidate
    index = torch.as_tensor(kept, dtype=torch.long, device=mlp.down_proj.weight.device)
    gate, up, *_ = repair.kept_gate_up(models.family_of(model.config), mlp, index)
    if not all(bool(t.isfinite().all()) for t in (gate, up, mlp.down_proj.weight.detach()[:, index])):
        raise ValueError(f"{name}: the kept channels' weights hold NaN or inf: the pruned model's output would not "
                         "be finite")
    warnings.warn(f"{name}: the re-fit is not finite (NaN or inf in the dropped channels' weights, or in the "
                  "calibration's activations): the layer keeps its channels' weights as they are", stacklevel=3)
    return None


def _reconstruct(model: nn.Module, stats: LayerStats, choice: Choice, fitted: torch.Tensor, group: runs.Group,
                 ridge: float) -> tuple[torch.Tensor, ...] | None:
    """--refit mlp: `repair.reconstruct` from the closed form `fitted` on every rank's rows (rank 0's result,
    broadcast, so that every rank holds the same bytes); None: the closed form stands."""
    mlp = stats.mlp
    family, activation = models.family_of(model.config), models.activation_of(model.config)
    kept = torch.as_tensor(choice.kept, dtype=torch.long, device=fitted.device)
    gate, up, *biases = repair.kept_gate_up(family, mlp, kept)
    rebuilt = repair.reconstruct(gate, up, fitted, stats.samples, activation=activation, biases=tuple(biases),
                                 original=mlp.down_proj.weight.detach()[:, kept], ridge=ridge,
                                 group=group if group.world > 1 else None, name=stats.name)
    if group.world > 1:
        if not group.broadcast(rebuilt is not None):
            return None
        rebuilt = rebuilt or (gate.float().clone(), up.float().clone(), fitted.float().clone())
        for tensor in rebuilt:
            group.broadcast_tensor(tensor)
    return rebuilt


def _on_cpu(choice: Choice) -> Choice:
    """A choice whose tensors can cross to another rank."""
    return Choice(choice.kept, *(None if t is None else t.cpu() for t in (choice.scores, choice.left)))


def _layer(scorer: ChannelScorer, layer: nn.Module, name: str, i: int, *, batches: list[Batch], streams: Streams,
           glu, post_normed: bool, samples: int | None = None) -> LayerStats:
    """Passes 1 and 2 over layer i: the unpruned stream scored and advanced, the pruned stream's statistics
    (`glu`: the activations function; `post_normed`: the family normalizes the MLP output; `samples`: this
    rank's first calibration row when --refit mlp keeps the MLP's inputs and targets, else None)."""
    mlp = layer.mlp
    outputs: list[torch.Tensor] = []
    tap = mlp.register_forward_hook(lambda m, a, out: outputs.append(out)) if post_normed else None
    try:
        with scorer.driven():
            for batch in batches:
                scorer.set_batch(batch.ids, batch.mask)
                streams.put(0, batch.rows, batch.run(layer, i, streams.rows(0, batch.rows)))
    finally:
        if tap is not None:
            tap.remove()
    stats = LayerStats(name, mlp, scorer.scores[name],
                       None if scorer.plain_scores is None else scorer.plain_scores[name],
                       None if scorer.grams is None else scorer.grams.pop(name))
    if len(streams.data) > 1:
        kept = None if samples is None else repair.Samples()
        stats.shifted_gram, stats.cross = _shifted_stats(scorer, layer, i, batches=batches, streams=streams, glu=glu,
                                                         mlp_outputs=outputs or None, samples=kept, first_row=samples)
        stats.samples = kept
    return stats


def _shifted_stats(scorer: ChannelScorer, layer: nn.Module, i: int, *, batches: list[Batch], streams: Streams,
                   glu, mlp_outputs: list | None, samples: repair.Samples | None = None,
                   first_row: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(G' = sum_t w_t h'_t h'_t^T, C = sum_t w_t r_t h'_t^T) over the pruned stream, float64: h' down_proj's
    input there, r the target of the pruned MLP's output (module docstring). With `samples`, also the MLP's
    inputs x', the targets r and the weights w of every batch go there, the rows whose index in the whole
    calibration set (`first_row` + the row here) is HOLD_OUT - 1 modulo repair.HOLD_OUT held out."""
    mlp = layer.mlp
    down = mlp.down_proj
    gram = torch.zeros(down.in_features, down.in_features, dtype=torch.float64, device=down.weight.device)
    cross = torch.zeros(down.out_features, down.in_features, dtype=torch.float64, device=down.weight.device)
    seen: list[torch.Tensor] = []
    inputs: list[torch.Tensor] = []

    def silenced(module, x):
        h = glu(module, x)
        seen.append(h)
        if samples is not None:
            inputs.append(x)
        return torch.zeros(*h.shape[:-1], down.out_features, dtype=h.dtype, device=h.device)

    with models.patched_forward(mlp, silenced):
        for b, batch in enumerate(batches):
            residual = batch.run(layer, i, streams.rows(1, batch.rows))
            h = seen.pop().reshape(-1, down.in_features).float()
            if mlp_outputs is None:
                target = streams.rows(0, batch.rows).to(residual.device) - residual
            else:
                target = mlp_outputs[b]
            target = target.to(h.device).reshape(-1, down.out_features).float()
            if down.bias is not None:
                target = target - down.bias.float()
            weights = scorer.weights_for(batch.ids, batch.mask)
            if samples is not None:
                x = inputs.pop()
                rows = torch.arange(batch.rows.start, batch.rows.stop, device=x.device) + first_row
                samples.add(x, target.reshape(x.shape), weights, rows % repair.HOLD_OUT == repair.HOLD_OUT - 1)
            weighted = h if weights is None else h * weights.reshape(-1, 1)
            gram.add_(weighted.T @ h)  # float32 products, summed across batches in float64
            cross.add_(target.T @ weighted)
    return gram, cross


def _advance(model: nn.Module, layer: nn.Module, i: int, *, batches: list[Batch], streams: Streams, glu,
             choice: Choice | None, refit: repair.Refit | None) -> None:
    """The pruned stream through the pruned layer i: down_proj reads the kept channels with the re-fitted
    columns, from the re-fitted gate/up rows where `mlp` re-fitted them (the original layer when nothing is
    cut)."""
    if choice is None or choice.kept is None:
        for batch in batches:
            streams.put(1, batch.rows, batch.run(layer, i, streams.rows(1, batch.rows)))
        return
    down = layer.mlp.down_proj
    index = torch.as_tensor(choice.kept, dtype=torch.long, device=down.weight.device)
    weight = (refit.down if refit is not None else down.weight.detach()[:, index]).to(down.weight)

    def sliced(module, x):
        return F.linear(glu(module, x).index_select(-1, index), weight, down.bias)

    rebuilt = refit is not None and refit.gate is not None
    forward = _rebuilt_forward(model, layer.mlp, index, refit, weight) if rebuilt else sliced
    with models.patched_forward(layer.mlp, forward):
        for batch in batches:
            streams.put(1, batch.rows, batch.run(layer, i, streams.rows(1, batch.rows)))


def _rebuilt_forward(model: nn.Module, mlp: nn.Module, index: torch.Tensor, refit: repair.Refit,
                     weight: torch.Tensor) -> Callable:
    """The forward of the MLP sliced to `index` with `refit`'s gate/up rows and down columns (`weight`), as the
    pruned checkpoint computes it (one fused gate_up GEMM for Phi-3)."""
    family, activation = models.family_of(model.config), models.activation_of(model.config)
    _, _, gate_bias, up_bias = repair.kept_gate_up(family, mlp, index)
    gate, up = (t.to(weight) for t in (refit.gate, refit.up))
    bias = mlp.down_proj.bias
    if family.fused_gate_up:
        fused = torch.cat([gate, up])
        fused_bias = None if gate_bias is None else torch.cat([gate_bias, up_bias])

        def forward(module, x):
            return F.linear(ck.glu_and_score(F.linear(x, fused, fused_bias), activation=activation), weight, bias)
    else:
        def forward(module, x):
            h = ck.glu_and_score(F.linear(x, gate, gate_bias), F.linear(x, up, up_bias), activation=activation)
            return F.linear(h, weight, bias)
    return forward


def _glu(model: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """mlp, x -> h = act(gate(x)) * up(x), the input of down_proj, as the model computes it."""
    family, activation = models.family_of(model.config), models.activation_of(model.config)

    def activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = family.gate_up(mlp, x)
        return ck.glu_and_score(gate, up, activation=activation)

    return activations


SEQUENTIAL = ("sequential", "mlp")  # the re-fits that run the pruned stream
