"""Loading a model to prune: a local Hugging Face directory, a hub id already in the local cache, or a
llama2.c checkpoint file; plus its tokenizer when it has one. Never downloads."""
from __future__ import annotations

import functools
import json
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import llama2c, models, shards
from .options import DTYPES, GGUF_INSTALL

Vet = Callable[[object, int], None]  # vet(tokenizer or None, embedding rows), before the weights are read
# --dtype names -> torch dtypes
DTYPE_NAMES = {name: getattr(torch, name) for name in DTYPES}


@dataclass(frozen=True)
class Storage:
    """How a source stores its weights: a name (a dtype, or "GGUF Q4_1": its most common tensor type) and the
    mean bits per weight (GGUF block scales included), which a prune's output is compared with."""

    name: str
    bits: float


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object | None
    source: str
    report: dict | None = None  # compact_report.json of a checkpoint this package pruned
    device: str = "cpu"  # where computation runs (a skeleton's weights stay on "meta": --offload layerwise)
    output_dtype: torch.dtype | None = None  # what a prune writes: --dtype, or with auto the source's storage dtype
    report_damaged: str | None = None  # why compact_report.json could not be read (None: fine or absent)
    gguf_tokenizer: dict | None = None  # a GGUF source's tokenizer.ggml.model and .pre (what a GGUF export reuses)
    storage: Storage | None = None  # how the source stores its weights (None: unknown)
    seconds: float | None = None  # how long loading took (None: a model handed over in Python)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def written_dtype(self) -> torch.dtype:
        """What a prune writes: --dtype when given, else the dtype the source is stored in (the compute dtype when
        that is unknown: GGUF, llama2.c, pickled weights, a model handed over in Python), in memory and offloaded
        alike."""
        return self.output_dtype or self.dtype

    @property
    def offloaded(self) -> bool:
        """`--offload layerwise`: weights not loaded (a meta skeleton); scoring loads one layer at a time from the
        files, pruning writes tensor by tensor."""
        return self.model.get_input_embeddings().weight.is_meta


def resolve_dtype(name: str, device: str, storage: torch.dtype | None = None) -> torch.dtype:
    """--dtype, the compute dtype (options.DTYPE_HELP says it for the user): auto means the dtype a model folder's
    weights are stored in (`storage`), float32 on a CPU when that is a 16-bit type; without a stored dtype (a
    .gguf or llama2.c file), bfloat16 on a GPU and float32 on a CPU."""
    if name == "auto":
        if storage is not None:
            return torch.float32 if device == "cpu" and storage in (torch.float16, torch.bfloat16) else storage
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPE_NAMES)}; got {name!r}")
    return DTYPE_NAMES[name]


def resolve_device(name: str | None) -> str:
    """--device: auto (cuda when present), cpu, cuda or cuda:N."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name != "cpu" and not match:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if match and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    if match and match.group(1) and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return name


def _hub_snapshot(model_id: str) -> Path | None:
    """The local cache folder of a hub id, or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def locate(source: str) -> Path:
    """The path behind MODEL: a directory with config.json, a llama2.c file, a .gguf file, or a cached hub id."""
    path = Path(source)
    if path.is_file() and (path.suffix == ".gguf" or llama2c.is_llama2c_checkpoint(path)):
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {source!r}: directory has no config.json")
        return path
    if path.is_file() and _magic(path) == b"GGUF":
        raise ValueError(f"model {source!r} is a GGUF file named {path.suffix or 'without a suffix'}: rename it to "
                         f"{path.stem}.gguf")
    if path.exists():
        raise ValueError(f"model {source!r}: not a Hugging Face directory, a .gguf file or a llama2.c checkpoint")
    snapshot = None if source.startswith((".", "/")) or source.count("/") > 1 else _hub_snapshot(source)
    if snapshot is None:
        raise FileNotFoundError(
            f"model {source!r} not found: not a local directory, a .gguf file, a llama2.c checkpoint, or a hub id in "
            "the local cache")
    return snapshot


def _timed(load_fn: Callable[..., Loaded]) -> Callable[..., Loaded]:
    """`load_fn` with the seconds it took in the Loaded it returns: loading is a phase of the report's timings."""
    @functools.wraps(load_fn)
    def timed(*args, **kwargs) -> Loaded:
        start = time.perf_counter()
        loaded = load_fn(*args, **kwargs)
        loaded.seconds = round(time.perf_counter() - start, 4)
        return loaded

    return timed


def _stored(dtype: torch.dtype | None) -> Storage | None:
    return None if dtype is None else Storage(str(dtype).removeprefix("torch."), float(torch.finfo(dtype).bits))


@_timed
def load(source: str, *, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False,
         tokenizer: str | None = None, vet: Vet | None = None) -> Loaded:
    """Load MODEL (see `locate`) in eval mode on `device`, with its tokenizer (None when it has none), or the
    --tokenizer named by `tokenizer` in its place. `vet(tokenizer, embedding rows)` runs before the weights are
    read, so that what the tokenizer alone can refuse costs no model load."""
    from transformers import AutoModelForCausalLM

    path, device = locate(source), resolve_device(device)
    storage = shards.storage_dtype(path) if path.is_dir() else None
    torch_dtype = resolve_dtype(dtype, device, storage)
    if path.suffix == ".gguf":
        return _load_gguf(path, torch_dtype, device, (tokenizer, vet))
    if path.is_file():
        model = llama2c.load_llama2c(path, dtype=torch_dtype).to(device)
        tok = _vetted(lambda: None, model.get_input_embeddings().num_embeddings, (tokenizer, vet), trust_remote_code)
        return Loaded(model, tok, str(path.resolve()), device=device)
    tok = _vetted(lambda: _own_tokenizer(path, trust_remote_code),
                  _embedding_rows(_config(path, trust_remote_code)), (tokenizer, vet), trust_remote_code)
    try:  # mis-shaped tensors are reported by _check_loading_info, naming them, instead of raising here
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except SafetensorError as e:
        raise ValueError(f"model {source!r}: a weights file is damaged or not safetensors ({e})") from None
    except pickle.UnpicklingError:
        raise ValueError(f"model {source!r}: its pickled .bin weights hold objects torch refuses to load safely; "
                         "convert the checkpoint to safetensors from a source you trust") from None
    _check_loading_info(source, info)
    return _with_report(Loaded(model.to(device).eval(), tok, str(path.resolve()), device=device,
                               output_dtype=_output(dtype, storage), storage=_stored(storage)))


def _load_gguf(path: Path, dtype: torch.dtype, device: str, tokenizer_opts: tuple) -> Loaded:
    """A GGUF file (llama.cpp's format, tokenizer inside) through transformers' GGUF support, dequantized to
    `dtype`: afterwards a plain model that save_pretrained writes as a normal safetensors checkpoint.
    `tokenizer_opts`: (--tokenizer or None, vet or None) as `load` takes them."""
    where = {"pretrained_model_name_or_path": path.parent, "gguf_file": path.name}
    with _tqdm_follows_transformers(), _one_gguf_reader():
        return _read_gguf(path, where, (dtype, device), tokenizer_opts)


@contextmanager
def _one_gguf_reader():
    """Inside the block, the file is parsed once: transformers' GGUF loading opens a new `gguf.GGUFReader` for the
    config (twice), the tokenizer and the weights, and this module for the metadata, each parsing every field
    again (SmolLM2's 49,152 tokens and merges: ~3 s each on a CPU). The readers are read-only. Likewise gguf's
    tensor name map of an architecture is built once: transformers builds it again for every module it names
    (397 times for SmolLM2, ~3 s), and it depends on the architecture and layer count alone."""
    import functools

    import gguf

    parse, name_map, readers = gguf.GGUFReader, gguf.get_tensor_name_map, {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = parse, name_map


@contextmanager
def _tqdm_follows_transformers():
    """transformers' GGUF reader draws a plain tqdm bar: hide it when transformers' own bars are off. (tqdm reads
    TQDM_DISABLE once, at import: the reader's own `tqdm` name is replaced for the call instead.)"""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as reader
    from transformers.utils import logging as hf_logging

    saved = reader.tqdm
    if not hf_logging.is_progress_bar_enabled():
        reader.tqdm = partial(saved, disable=True)
    try:
        yield
    finally:
        reader.tqdm = saved


def _read_gguf(path: Path, where: dict, placement: tuple, tokenizer_opts: tuple) -> Loaded:
    """The GGUF loading itself; what transformers cannot read is one ValueError line. `placement`: (dtype, device)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype, device = placement
    with _gguf_errors(path):
        config = AutoConfig.from_pretrained(**where)
        models.family_of(config)  # GGUF quantization is undone on loading: no check_prunable

    def own():
        with _gguf_errors(path):
            return _fitted(AutoTokenizer.from_pretrained(**where), _embedding_rows(config))

    tokenizer = _vetted(own, _embedding_rows(config), tokenizer_opts)
    with _gguf_errors(path):
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
    model.hf_quantizer = None  # dequantized already; else save_pretrained refuses a "gguf-quantized" model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return Loaded(model.to(device).eval(), tokenizer, str(path.resolve()), device=device,
                  gguf_tokenizer=_gguf_tokenizer(path), storage=_gguf_storage(path))


def _fitted(tokenizer, rows: int):
    """A GGUF's tokenizer without the ids past the model's `rows` embedding rows: transformers' conversion adds
    GPT-2's default `<|endoftext|>` to a byte-level vocabulary that lacks it (Llama 3's), a token with no row."""
    ids = sorted(tokenizer.get_vocab().values())
    if not ids or ids[-1] < rows:
        return tokenizer
    from .tokenizer import prune_tokenizer

    return prune_tokenizer(tokenizer, [i for i in ids if i < rows])


def gguf_strings(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    """The string metadata `keys` a GGUF file holds (those it lacks are left out), read without its tensors."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    return {key: bytes(fields[key].parts[fields[key].data[0]]).decode() for key in keys if key in fields}


def _gguf_storage(path: Path) -> Storage:
    """A GGUF file's storage: its most common tensor type (by weights) and its mean bits per weight."""
    import collections

    import gguf

    weights, size = collections.Counter(), 0
    for tensor in gguf.GGUFReader(str(path)).tensors:
        weights[tensor.tensor_type.name] += int(tensor.n_elements)
        size += int(tensor.n_bytes)
    return Storage(f"GGUF {weights.most_common(1)[0][0]}", 8 * size / max(sum(weights.values()), 1))


def _gguf_tokenizer(path: Path) -> dict | None:
    """{"model": tokenizer.ggml.model, "pre": tokenizer.ggml.pre} of a GGUF file (None when it names neither)."""
    found = gguf_strings(path, ("tokenizer.ggml.model", "tokenizer.ggml.pre"))
    if "tokenizer.ggml.model" not in found:
        return None
    return {"model": found["tokenizer.ggml.model"], "pre": found.get("tokenizer.ggml.pre", "default")}


@contextmanager
def _gguf_errors(path: Path) -> Iterator[None]:
    """What transformers' GGUF reader raises, as one ValueError line naming `path`."""
    try:
        yield
    except ImportError as e:
        raise ValueError(f"model {path}: loading GGUF needs the gguf and accelerate packages "
                         f"({GGUF_INSTALL}): {' '.join(str(e).split())}") from None
    except models.UnsupportedModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the GGUF reader fails in many ways (struct.error on a short file)
        raise ValueError(f"model {path}: transformers cannot read this GGUF file "
                         f"({' '.join(str(e).split())[:300]})") from None


def _check_loading_info(source: str, info: dict) -> None:
    """Missing, unexpected or mis-shaped tensors are an error: transformers would invent or drop weights."""
    names = {key: [str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ()]
             for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    shards.check_tensor_names(source, names["missing_keys"], names["unexpected_keys"], names["mismatched_keys"])


@_timed
def load_skeleton(source: str, *, dtype: str = "auto", device: str | None = None,
                  trust_remote_code: bool = False, tokenizer: str | None = None, vet: Vet | None = None) -> Loaded:
    """MODEL without its weights (on the meta device), with tokenizer and report: enough to prepare data and
    choose the vocabulary for `--offload layerwise`, whose scoring and slicing read the weights themselves.
    `tokenizer` and `vet` as `load` takes them."""
    path, device = locate(source), resolve_device(device)
    if path.is_file():
        raise ValueError(f"model {source!r}: --offload layerwise needs a Hugging Face safetensors directory, "
                         f"not a {'GGUF' if path.suffix == '.gguf' else 'llama2.c'} file (prune it in memory, or "
                         "convert it first)")
    storage = shards.storage_dtype(path)
    config = _config(path, trust_remote_code)
    tok = _vetted(lambda: _own_tokenizer(path, trust_remote_code), _embedding_rows(config), (tokenizer, vet),
                  trust_remote_code)
    model = shards.skeleton(config, resolve_dtype(dtype, device, storage))
    return _with_report(Loaded(model, tok, str(path.resolve()), device=device, output_dtype=_output(dtype, storage),
                               storage=_stored(storage)))


def _output(name: str, storage: torch.dtype | None) -> torch.dtype | None:
    """The dtype a prune writes: --dtype when given, else the source's storage dtype (None: the compute dtype)."""
    return DTYPE_NAMES[name] if name != "auto" else storage


def load_tokenizer(source: str, vocab_rows: int | None = None, trust_remote_code: bool = False):
    """--tokenizer for a model without one (or to replace its own): a Hugging Face tokenizer folder, a
    `tokenizer.json`, or a SentencePiece BPE `tokenizer.model` (Llama/Mistral style, byte fallback). With
    `vocab_rows`, every id the tokenizer can produce must have an embedding row."""
    from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--tokenizer {source}: no such file or directory")
    try:
        if path.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        elif path.suffix == ".json":
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif path.suffix == ".model":
            # transformers 5 converts a SentencePiece model only through from_pretrained on a folder.
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "tokenizer.model").symlink_to(path.resolve())
                tokenizer = LlamaTokenizer.from_pretrained(tmp)
        else:
            raise ValueError("expected a tokenizer folder, a tokenizer.json or a SentencePiece tokenizer.model")
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"--tokenizer {source}: cannot load it: {e}") from None
    if vocab_rows is not None:
        _check_fits(tokenizer, vocab_rows, f"--tokenizer {source}")
    return tokenizer


def _check_fits(tokenizer, vocab_rows: int, what: str) -> None:
    """Every id `tokenizer` can produce has an embedding row, else a one-line ValueError naming `what`."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= vocab_rows:
        raise ValueError(f"{what}: it has ids up to {largest:,} but the model's embedding has {vocab_rows:,} rows: "
                         f"not this model's tokenizer")


def _config(path: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    models.check_prunable(config, path)
    return config


def _embedding_rows(config) -> int:
    """The embedding rows a config declares (its text model's vocab_size)."""
    return int(config.get_text_config().vocab_size)


def _vetted(own: Callable[[], object], rows: int, tokenizer_opts: tuple, trust_remote_code: bool = False):
    """The tokenizer a load hands out: `own()` (the model's own, None when it has none), or the --tokenizer
    standing in for it (checked against the `rows` embedding rows), then vetted. `tokenizer_opts`: (--tokenizer
    or None, vet or None)."""
    stand_in, vet = tokenizer_opts
    tokenizer = own() if stand_in is None else load_tokenizer(stand_in, rows, trust_remote_code)
    if vet is not None:
        vet(tokenizer, rows)
    return tokenizer


def _own_tokenizer(path: Path, trust_remote_code: bool):
    """The tokenizer of a model folder, None when it has none; damaged files are one ValueError line."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer fails in many ways
        raise ValueError(f"model {path}: its tokenizer files cannot be loaded ({' '.join(str(e).split())[:200]}); "
                         "name a working one with --tokenizer") from None


def held(model, tokenizer=None) -> Loaded:
    """A model (with its tokenizer) already in memory, in eval mode, as the pipeline takes it; the
    compact_report.json of the folder it was loaded from, when compact pruned it."""
    source = getattr(model.config, "_name_or_path", "") or "a model in memory"
    source = str(Path(source).resolve()) if Path(source).exists() else source
    models.check_prunable(model.config, source)
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"the model's weights are not loaded ({meta} is on the meta device): load them first")
    if tokenizer is not None:
        _check_fits(tokenizer, model.get_input_embeddings().num_embeddings, "the tokenizer")
    loaded = Loaded(model.eval(), tokenizer, source, device=str(model.get_input_embeddings().weight.device))
    return _with_report(loaded) if Path(source).is_dir() else loaded


def _with_report(loaded: Loaded) -> Loaded:
    """`loaded` with compact_report.json of its folder (when this package made it)."""
    loaded.report, loaded.report_damaged = _read_report(Path(loaded.source) / "compact_report.json")
    return loaded


def _read_report(path: Path) -> tuple[dict | None, str | None]:
    """(compact_report.json, None), (None, None) when absent, or (None, why) when it cannot be read: only
    token-id data needs it (to renumber original ids), so only that data is refused."""
    if not path.is_file():
        return None, None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        report["kept_token_ids"], report["sizes"]["vocab_before"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, (f"{path} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}): token-id data in "
                      "the original model's ids cannot be renumbered for this pruned model; use text data")
    return report, None
