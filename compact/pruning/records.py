"""The prune's records: what a decision is computed from (`Job`), what a calibration pass gave (`Pass`, with
--check's `Check`), and the frozen `Decision` itself; `Timings` is the clock of its steps."""
from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from .. import budget, data, models, repair, runs, vocab
from ..loading import Loaded
from ..options import DATA_FREE, CalibOptions, Method, Run

class CheckFailed(RuntimeError):
    """--check found the fused scores off the hook reference."""


STEPS = ("calibration", "token counts", "planning", "vocabulary", "scoring", "selection")


class Timings(dict):
    """Seconds per phase, in the order the phases ran."""

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self[name] = round(self.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass(frozen=True)
class Job:
    """What a decision is computed from: the model, the method (`vocab_order` and `refit` resolved), the
    calibration options, the run options, the last step (one of STEPS), the model's vocabulary, the ranks and
    the checkpoints."""

    loaded: Loaded
    method: Method
    calib: CalibOptions
    run: Run
    upto: str
    vocabulary: vocab.Vocabulary  # of the model as loaded: built once, for the policy and the planner's curve
    group: runs.Group  # torchrun's ranks (the engine's passes share the calibration rows between them)
    checkpoints: runs.Checkpoints  # where and when the engine's passes save resume checkpoints

    @property
    def intermediate(self) -> int:
        return models.intermediate_size(self.loaded.model)

    @property
    def data_scores(self) -> bool:
        """Scores come from a pass over calibration data (not a file, not a data-free criterion)."""
        return self.method.scores is None and self.method.ffn_criterion not in DATA_FREE

    def cuts(self, ffn_keep: int | None) -> bool:
        """A prune that keeps `ffn_keep` channels per layer cuts the FFN."""
        return self.upto == "selection" and ffn_keep is not None and ffn_keep < self.intermediate

    def kept_ids(self, counts: torch.Tensor | None, vocab_keep: int | None) -> list[int] | None:
        """The token ids the vocabulary policy keeps at `vocab_keep` (None: the vocabulary is not cut)."""
        method = self.method
        always = vocab.read_always_file(method.vocab_always) if method.vocab_always else ()
        return self.vocabulary.kept(vocab_keep, order=method.vocab_order, counts=counts, always=always,
                                    prior=method.vocab_prior)


@dataclass(frozen=True)
class Check:
    """--check's comparison of the fused scores with the hook path: over `sequences` rows, the largest
    difference relative to a layer's maximum, where, the tolerance, and whether it held."""

    sequences: int
    max_rel_diff: float
    worst_layer: str | None
    rtol: float
    ok: bool


@dataclass(frozen=True)
class Pass:
    """What a calibration pass gave: scores per MLP by the criterion, --check's result, and (when it chose them
    as it went) the kept channels and their re-fit (`repair.Refit`) per cut MLP; None where it gave none."""

    scores: Mapping[str, torch.Tensor] | None = None
    check: Check | None = None
    kept_channels: Mapping[str, list[int]] | None = None
    refits: Mapping[str, "repair.Refit"] | None = None


@dataclass(frozen=True)
class Sizes:
    """The vocabulary rows and FFN channels per layer before and after the cut, the layers and the hidden size
    (compact_report.json's "sizes")."""

    vocab_before: int
    vocab_after: int
    intermediate_before: int
    intermediate_after: int
    layers: int
    hidden: int


@dataclass(frozen=True)
class Decision:
    """What a prune keeps and why. `method`: as applied (`vocab_order` and `refit` resolved); `plan`: the
    planner's record for --target-params (the candidates weighed, the choice, measured trials); `vocab_keep`
    and `ffn_keep` (channels per layer): the sizes; `kept_token_ids` (None: vocabulary not cut) and
    `kept_channels` (None: FFN not cut): what stays; `refits`: the re-fit per cut MLP (`repair.Refit`:
    down_proj's kept columns [D, K], and with --refit mlp gate/up's kept rows [K, D]);
    `scores`: per MLP by the criterion; `check`: --check's comparison with hooks; `parameters_before`, `sizes`
    and `dtype` (the compute dtype): of the model as decided on; `model`: which model that was (`apply` and
    `write` refuse another, or the same one already cut); `timings`: seconds per step. Fields of steps
    past `upto` stay None. Read-only throughout: mappings are read-only views, id lists tuples."""

    method: Method
    calib: CalibOptions
    calibration: data.Calibration | None = None
    plan: budget.Plan | None = None
    vocab_keep: int | None = None
    ffn_keep: int | None = None
    kept_token_ids: tuple[int, ...] | None = None
    scores: Mapping[str, torch.Tensor] | None = None
    check: Check | None = None
    kept_channels: Mapping[str, tuple[int, ...]] | None = None
    refits: Mapping[str, "repair.Refit"] | None = None
    parameters_before: Mapping[str, int] | None = None
    sizes: Sizes | None = None
    dtype: torch.dtype | None = None
    model: models.Identity | None = None
    timings: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        """Maps copied into read-only views, id lists into tuples; `timings` a view of decide's clock, which adds
        its last phases after the decision is made."""
        frozen = {name: _read_only(getattr(self, name)) for name in ("scores", "refits", "parameters_before")}
        if self.kept_channels is not None:
            frozen["kept_channels"] = _read_only({name: tuple(kept) for name, kept in self.kept_channels.items()})
        if self.kept_token_ids is not None:
            frozen["kept_token_ids"] = tuple(self.kept_token_ids)
        if not isinstance(self.timings, MappingProxyType):
            frozen["timings"] = MappingProxyType(self.timings)
        for name, value in frozen.items():
            object.__setattr__(self, name, value)


def _read_only(mapping: Mapping | None) -> Mapping | None:
    """A read-only copy of `mapping` (None stays None)."""
    return None if mapping is None else MappingProxyType(dict(mapping))
