"""The option groups of a prune, one per lifetime: what the method does (`Method`), which calibration data
(`compact.data.CalibOptions`), how this run goes (`Run`), where the result goes (`Output`) and how the model is
loaded (`Load`). Only the method and the calibration change the sums: they alone make a resume signature."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from . import engine, vocab
from .data import CalibOptions

# A method's choices: what the engine and the vocabulary policy do, and "auto" (resolved by pipeline.decide).
VOCAB_ORDERS = ("auto", *vocab.VOCAB_ORDERS)
REFITS = ("auto", *engine.REFITS)
SELECTIONS = ("scores", "obs")  # the top of the criterion, or repair.eliminate


@dataclass(frozen=True)
class Method:
    """What to cut and how to choose it. `vocab_keep`: regular tokens kept (plus specials); `ffn_keep`: channels
    per layer, a count ("128", "1ch") or a ratio ("0.5"); or `target_params`, the fraction of parameters kept,
    split between the two by the planner (`plan_trials`: that many best-priced splits pruned and measured).
    `vocab_order` auto is frequency with calibration data, else id; `refit` auto is sequential when calibration
    data drives an FFN cut, else none; `ffn_select` obs: elimination for the re-fit instead of the top scores."""

    vocab_keep: int | None = None
    ffn_keep: str | int | float | None = None
    target_params: float | None = None
    vocab_order: str = "auto"
    vocab_always: str | None = None
    ffn_multiple: int = 64
    ffn_criterion: str = "common-act2"
    seed: int = 0
    scores: str | None = None
    refit: str = "auto"
    ffn_select: str = "scores"
    plan_trials: int = 0

    def __post_init__(self):
        """The checks the command line's parser makes, for a Method built in Python."""
        from .criteria import check_criterion
        from .selection import parse_ffn_keep

        check_criterion(self.ffn_criterion)
        for name, value, allowed in (("vocab_order", self.vocab_order, VOCAB_ORDERS),
                                     ("refit", self.refit, REFITS), ("ffn_select", self.ffn_select, SELECTIONS)):
            if value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")
        for name, value, low in (("vocab_keep", self.vocab_keep, 1), ("ffn_multiple", self.ffn_multiple, 1),
                                 ("plan_trials", self.plan_trials, 0)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer of at least {low}, got {value!r}")
        if self.target_params is not None and not 0 < self.target_params <= 1:
            raise ValueError(f"--target-params must be a fraction in (0, 1], got {self.target_params!r}")
        if self.ffn_keep is not None and not parse_ffn_keep(self.ffn_keep) > 0:
            raise ValueError(f"--ffn-keep must be positive (a count or a ratio in (0, 1]), got {self.ffn_keep!r}")


@dataclass(frozen=True)
class Run:
    """How this run goes (nothing here changes the result): sequences per forward, progress bars (None: on a
    terminal), `check` the fused scores against hooks on `check_batches` batches, checkpoints of the engine's
    passes: saved into the folder `checkpoint` every `checkpoint_every` layers, continued with `resume`; and
    `host_memory`, the bytes of host memory the calibration streams may take (None: half the available;
    beyond it they go to a disk memmap)."""

    batch_size: int = 1
    progress: bool | None = None
    check: bool = False
    check_batches: int = 2
    checkpoint: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    host_memory: int | None = None


@dataclass(frozen=True)
class Output:
    """Where a prune goes: the folder, whether it may replace one, and a GGUF copy (type, pre-tokenizer name)."""

    out: Path | None = None
    overwrite: bool = False
    gguf: str | None = None
    gguf_pre: str | None = None


@dataclass(frozen=True)
class Load:
    """How MODEL is loaded (compact.loading): device, compute dtype, remote code, a stand-in tokenizer, and
    `offload` layerwise: never the whole model in memory."""

    source: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    tokenizer: str | None = None
    offload: str = "none"


def signature(method: Method, calib: CalibOptions, model: str, dtype) -> dict:
    """What a resume checkpoint must match: the method and the calibration (the file's size and time too), for
    this model in this dtype."""
    calibration = {**asdict(calib)}
    if calib.path and Path(calib.path).is_file():
        stat = Path(calib.path).stat()
        calibration["file"] = f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}"
    return {"method": _strings(asdict(method)), "calibration": _strings(calibration), "model": str(model),
            "dtype": str(dtype)}


def _strings(values: dict) -> dict:
    return {k: str(v) for k, v in values.items()}
