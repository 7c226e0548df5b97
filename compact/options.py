"""The option groups of a prune, one per lifetime: what the method does (`Method`), which calibration data
(`CalibOptions`), how this run goes (`Run`), where the result goes (`Output`) and how the model is loaded
(`Load`); every set of choices an option takes, and each rule a value must follow, checked where its group is
built (the command line's parser reads the choices and holds its text to the same rules). Only the method and
the calibration change the sums: they alone make a resume signature. Imports no torch: `compact --help` reads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

VOCAB_ORDERS = ("id", "frequency")  # the vocabulary policy's orders (compact.vocab)
REFITS = ("none", "same-input", "sequential", "mlp")  # the engine's re-fits: down_proj's kept columns, or the MLP
SELECTIONS = ("scores", "obs")  # the top of the criterion, or repair.eliminate
CRITERIA = {  # the FFN channel criteria (compact.criteria)
    "common-act2": "sum of h_c^2 over calibration tokens in the kept vocabulary (COMPACT's criterion)",
    "act2": "sum of h_c^2 over all calibration tokens (no vocabulary weighting)",
    "wanda": "||W_down[:, c]||_1 * ||h_c||_2 over all calibration tokens (Wanda's |W|*||X||, per channel)",
    "magnitude": "L2 norm of the channel's weights: its gate and up rows and its down_proj column (no data)",
    "random": "seeded uniform random scores (a baseline; no data)",
}
DATA_FREE = ("magnitude", "random")  # criteria that need no calibration data
PATHS = ("auto", "fused", "hooks")  # scoring paths ("backend" in compact_kernels is triton or torch)
DTYPES = ("bfloat16", "float16", "float32")  # compute dtypes (compact.loading)
DTYPE_HELP = ("the compute dtype, and the dtype a prune writes; auto (the default): a model folder computes in the "
              "dtype its weights are stored in (float32 on a CPU when that is 16-bit) and writes that stored dtype; a "
              ".gguf or llama2.c file computes and writes bfloat16 on a GPU, float32 on a CPU")  # loading.resolve_dtype
OFFLOADS = ("none", "layerwise")  # layerwise: the model is never whole in memory
BIN_DTYPES = ("uint16", "uint32")  # id widths of a .bin token file (compact.data)
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # what --gguf writes (compact.export)
GGUF_INSTALL = "pip install 'compact-kernels[gguf]'"  # the distribution's name: `compact` on PyPI is another package

# Each flag with a set of values -> that set ("auto": pruning.decide, or for --dtype compact.loading, resolves it).
CHOICES = {
    "--vocab-order": ("auto", *VOCAB_ORDERS), "--refit": ("auto", *REFITS), "--ffn-select": SELECTIONS,
    "--ffn-criterion": tuple(CRITERIA), "--dtype": ("auto", *DTYPES), "--offload": OFFLOADS,
    "--calib-dtype": BIN_DTYPES, "--gguf": GGUF_TYPES,
}


def one_of(choices: tuple, value) -> str | None:
    """What is wrong with `value` as one of `choices` (None: nothing)."""
    return None if value in choices else f"must be one of {', '.join(choices)}; got {value!r}"


def count(value, low: int = 1) -> str | None:
    """What is wrong with `value` as an integer of at least `low` (None: nothing; an absent option passes)."""
    if value is None or isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return None
    return f"must be an integer of at least {low}, got {value!r}"


def fraction(value) -> str | None:
    """What is wrong with `value` as a fraction in (0, 1] (None: nothing; an absent option passes)."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return None
    return f"must be a fraction in (0, 1], got {value!r}"


def weight(value) -> str | None:
    """What is wrong with `value` as a non-negative finite number (None: nothing)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf"):
        return None
    return f"must be a number of at least 0, got {value!r}"


def positive(value) -> str | None:
    """What is wrong with `value` as a positive finite number (None: nothing)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"):
        return None
    return f"must be a positive number, got {value!r}"


def seed(value) -> str | None:
    """What is wrong with `value` as a random seed (None: nothing): an integer torch's generators take."""
    if isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**64:
        return None
    return f"must be an integer in [-2^63, 2^64), got {value!r}"


# --vocab-keep and --ffn-keep -> (the unit a count may carry, what it counts, where)
KEEPS = {"--vocab-keep": ("tok", "token", ""), "--ffn-keep": ("ch", "channel", " per layer")}


def keep(value, flag: str) -> str | None:
    """What is wrong with `value` as `flag`, --vocab-keep or --ffn-keep (None: nothing; an absent option passes);
    see parse_keep."""
    if value is None:
        return None
    try:
        number = parse_keep(value, flag)
    except ValueError as e:
        return str(e).removeprefix(f"{flag} ")
    if number <= 0:
        return f"must be positive (a count or a ratio in (0, 1]), got {value!r}"
    if isinstance(number, float) and number > 1:
        return f"as a ratio must be in (0, 1] (a {KEEPS[flag][1]} count is an integer), got {value!r}"
    return None


def parse_keep(value: float | int | str, flag: str) -> int | float:
    """`flag` (--vocab-keep or --ffn-keep) as a count (an int, "128", or "1tok" / "1ch" with the flag's unit) or a
    ratio in (0, 1] (a float, "0.5", "1.0"). A bare "1" is refused: one and all are both plausible readings."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    unit, noun, where = KEEPS[flag]
    text = str(value).strip()
    digits = text[:-len(unit)] if text.lower().endswith(unit) else text
    if digits.lstrip("+") == "1" and digits is text:
        raise ValueError(f"{flag} 1 is ambiguous: write 1{unit} to keep one {noun}{where}, or 1.0 to keep all")
    if digits.lstrip("+").isdigit():
        return int(digits)
    try:
        if digits is text:
            return float(text)
    except ValueError:
        pass
    raise ValueError(f"{flag} must be a {noun} count (128, 1{unit}) or a ratio in (0, 1] (0.5, 1.0), got {value!r}")


def _refuse(problems: dict[str, str | None]) -> None:
    """A one-line ValueError naming the flag of the first problem, if any."""
    for flag, problem in problems.items():
        if problem:
            raise ValueError(f"{flag} {problem}")


@dataclass(frozen=True)
class Method:
    """What to cut and how to choose it. `vocab_keep`: regular tokens kept (plus specials), a count (24576, "1tok")
    or a ratio of the regular tokens (0.5); `ffn_keep`: channels per layer, a count (128, "1ch") or a ratio (0.5):
    an int is a count, a float a ratio; or `target_params`, the fraction of parameters kept,
    split between the two by the planner (`plan_trials`: that many best-priced splits pruned and measured).
    `vocab_order` auto is frequency with calibration data, else id; `vocab_prior` (lambda) blends frequency
    order's counts with the tokenizer's own prior, counts + lambda * N * prior (compact.vocab); `refit` auto is sequential when calibration
    data drives an FFN cut, else none; `ffn_select` obs: elimination for the re-fit instead of the top scores."""

    vocab_keep: str | int | float | None = None
    ffn_keep: str | int | float | None = None
    target_params: float | None = None
    vocab_order: str = "auto"
    vocab_prior: float = 0.0
    vocab_always: str | None = None
    ffn_multiple: int = 64
    ffn_criterion: str = "common-act2"
    seed: int = 0
    scores: str | None = None
    refit: str = "auto"
    ffn_select: str = "scores"
    plan_trials: int = 0

    def __post_init__(self):
        """The method's rules (the command line's parser holds its text to the same ones)."""
        chosen = {"--vocab-order": self.vocab_order, "--refit": self.refit, "--ffn-select": self.ffn_select,
                  "--ffn-criterion": self.ffn_criterion}
        _refuse({**{flag: one_of(CHOICES[flag], value) for flag, value in chosen.items()},
                 "--vocab-keep": keep(self.vocab_keep, "--vocab-keep"),
                 "--ffn-keep": keep(self.ffn_keep, "--ffn-keep"),
                 "--target-params": fraction(self.target_params), "--vocab-prior": weight(self.vocab_prior),
                 "--ffn-multiple": count(self.ffn_multiple),
                 "--plan-trials": count(self.plan_trials, low=0), "--seed": seed(self.seed)})


CALIB_SUFFIXES = (".txt", ".jsonl", ".npy", ".bin")  # calibration formats (compact.data), what a folder offers


@dataclass(frozen=True)
class CalibOptions:
    """Which calibration data to read and how much of it: up to `samples` rows of `seq_len` token ids
    (`bin_dtype`: the id width of a .bin file). `path`: a file, a folder (its calibration files, by name) or
    several of either (a tuple): the rows are shared out evenly and interleaved, and each source's token counts
    weigh the same, so that several domains calibrate together. `generate`: that many texts the model writes
    itself (compact.generate, each up to `seq_len` tokens and at most 512, seeded by the method's seed) join them
    as one more source."""

    path: str | tuple[str, ...] | None = None
    samples: int = 16
    seq_len: int = 2048
    bin_dtype: str | None = None
    generate: int = 0

    def __post_init__(self):
        if isinstance(self.path, (list, tuple)):  # one path is kept as a string (what the report and resume read)
            paths = tuple(str(p) for p in self.path)
            object.__setattr__(self, "path", paths[0] if len(paths) == 1 else paths or None)
        elif self.path is not None:
            object.__setattr__(self, "path", str(self.path))
        _refuse({"--samples": count(self.samples), "--seq-len": count(self.seq_len),
                 "--calib-generate": count(self.generate, low=0)})
        if self.bin_dtype is not None and self.paths and not any(Path(p).suffix == ".bin" or Path(p).is_dir()
                                                                 for p in self.paths):
            raise ValueError(f"--calib-dtype gives the id width of a .bin token file; {', '.join(self.paths)} holds "
                             "none (a .npy file records its own width, and text is tokenized)")

    @property
    def given(self) -> bool:
        """Any calibration data: files, or text the model writes."""
        return self.path is not None or self.generate > 0

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths given (files or folders)."""
        return () if self.path is None else (self.path,) if isinstance(self.path, str) else self.path

    def files(self) -> tuple[Path, ...]:
        """The calibration files, a folder's in name order: FileNotFoundError for one that is not there,
        ValueError for a folder without any."""
        files = []
        for path in map(Path, self.paths):
            if path.is_dir():
                found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CALIB_SUFFIXES)
                if not found:
                    raise ValueError(f"{path}: a folder without calibration files ({', '.join(CALIB_SUFFIXES)})")
                files += found
            elif not path.exists():
                raise FileNotFoundError(f"{path}: calibration file not found")
            else:
                files.append(path)
        return tuple(files)


def check_method(method: Method, calib: CalibOptions, *, prune: bool) -> None:
    """The rules that join the method and the calibration, from the options alone (before any model is read):
    a one-line ValueError naming the flags. `prune`: for a prune (not `compact score` or `plan`)."""
    data_driven = method.scores is None and method.ffn_criterion not in DATA_FREE
    fitted = method.refit not in ("auto", "none") or method.ffn_select == "obs"
    if fitted and not data_driven:
        raise ValueError("--refit and --ffn-select obs fit down_proj on the calibration pass: they need --calib and "
                         "a data-driven --ffn-criterion (not --scores or magnitude/random)")
    if method.scores is not None and method.ffn_criterion != Method.ffn_criterion:
        raise ValueError(f"--scores gives the channel scores: --ffn-criterion {method.ffn_criterion} would be ignored "
                         "(score with it: compact score --ffn-criterion ...; or drop one)")
    if prune and method.target_params is not None and (method.vocab_keep or method.ffn_keep):
        raise ValueError("give --target-params, or --vocab-keep/--ffn-keep, not both")
    if prune and method.target_params is None and method.vocab_keep is None and method.ffn_keep is None:
        raise ValueError("nothing to prune: give --vocab-keep and/or --ffn-keep, or --target-params")
    if prune and method.vocab_always and method.vocab_keep is None and method.target_params is None:
        raise ValueError("--vocab-always keeps tokens in a vocabulary cut: add --vocab-keep or --target-params")
    if method.vocab_prior and method.vocab_order == "id":
        raise ValueError("--vocab-prior blends the token counts of --vocab-order frequency; --vocab-order id keeps "
                         "the lowest ids: drop one")
    needs = {"--target-params": method.target_params is not None, "--vocab-prior": method.vocab_prior > 0, f"--refit {method.refit}": fitted,
             "--ffn-select obs": method.ffn_select == "obs",
             "--vocab-order frequency": method.vocab_order == "frequency",
             f"--ffn-criterion {method.ffn_criterion}": data_driven and (not prune or _cuts_ffn(method.ffn_keep))}
    wanting = [flag for flag, needed in needs.items() if needed]
    if wanting and not calib.given:
        raise ValueError(f"{wanting[0]} needs calibration data: pass --calib PATH (or --calib-generate N)")


def _cuts_ffn(ffn_keep) -> bool:
    """--ffn-keep may cut (a ratio of 1.0 keeps every channel; whether a count does, the model tells)."""
    if ffn_keep is None:
        return False
    value = parse_keep(ffn_keep, "--ffn-keep")
    return isinstance(value, int) or value < 1.0


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

    def __post_init__(self):
        _refuse({"--batch-size": count(self.batch_size), "--checkpoint-every": count(self.checkpoint_every, low=0),
                 "--host-memory": None if self.host_memory is None else count(self.host_memory, low=0)})


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
    this model (its weight and config files' sizes and times too: weights changed in place are another model) in
    this dtype."""
    calibration = {**asdict(calib)}
    if calib.paths and all(Path(p).exists() for p in calib.paths):
        calibration["file"] = "; ".join(f"{p.name}: {_stamp(p)}" for p in calib.files())
    return {"method": _strings(asdict(method)), "calibration": _strings(calibration), "model": str(model),
            "model files": _model_files(Path(str(model))), "dtype": str(dtype)}


def _model_files(path: Path) -> dict:
    """{file name: size and time} of a model's weight and config files (the file itself for a single file)."""
    if path.is_file():
        return {path.name: _stamp(path)}
    files = [p for p in sorted(path.glob("*")) if p.suffix in (".safetensors", ".bin", ".gguf", ".json")]
    return {p.name: _stamp(p) for p in files if p.is_file()} if path.is_dir() else {}


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size} bytes, mtime {stat.st_mtime_ns}"


def _strings(values: dict) -> dict:
    return {k: str(v) for k, v in values.items()}
