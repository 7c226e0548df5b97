"""A pruned checkpoint as a GGUF file, for llama.cpp and what is built on it (ollama, LM Studio).

llama.cpp's own converter refuses a cut vocabulary: it names a byte-level BPE pre-tokenizer by hashing how the
tokenizer splits a probe text, and a cut vocabulary splits it differently. This writes the file the converter
would have written for the uncut model, with the cut model's tensors and vocabulary, through the `gguf` package
(llama.cpp's own Python library: its writer, tensor names, quantizers and special-vocabulary reader):

- tensors under llama.cpp's names (`gguf.TensorNameMap`), q/k rows permuted for the llama architecture as the
  converter does, norms in float32, matrices in the chosen type (F32, F16, BF16 or Q8_0);
- hyper-parameters under llama.cpp's keys (context length, widths, heads, rope, the pruned FFN and vocabulary);
- the tokenizer as the converter writes it: the cut tokenizer's tokens, types, merges and special ids, with the
  tokenizer kind and pre-tokenizer name of the *source* model (for a GGUF source, its `tokenizer.ggml.model` and
  `tokenizer.ggml.pre`, which compact_report.json records; else recognised from the split pattern).

Architectures: llama (Llama 2 / 3.x, SmolLM, TinyLlama, Mistral), qwen2, qwen3.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .options import GGUF_INSTALL, GGUF_TYPES
from .tokenizer import merge_pair

CANONICAL_PRE = ("llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o")  # what llama.cpp's converter writes for them
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError(f"writing GGUF needs the gguf package: {GGUF_INSTALL}") from None
    return gguf


def check_exportable(source: str, pre: str | None = None) -> None:
    """Refuse `--gguf` before any work: without the gguf package, for a model type the export does not write, or
    for a tokenizer whose llama.cpp identity is unknown (`pre` names the pre-tokenizer)."""
    from transformers import AutoConfig

    from .loading import gguf_strings, locate

    _gguf()
    path = locate(source)
    if path.suffix == ".gguf":
        model_type = gguf_strings(path, ("general.architecture",)).get("general.architecture")
    elif path.is_file():
        model_type = "llama"  # a llama2.c checkpoint
    else:
        model_type = AutoConfig.from_pretrained(path).model_type
    _architecture(model_type, f"--gguf: {source}")
    if path.is_dir() and (path / "tokenizer.json").is_file():  # the cut keeps the source's kind and pre-tokenizer
        source_tokenizer(path, json.loads((path / "tokenizer.json").read_text(encoding="utf-8")), pre)


def _architecture(model_type: str | None, what: str) -> str:
    """llama.cpp's architecture for a Hugging Face model type; other types are a one-line error naming `what`."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{what}: GGUF export supports the {', '.join(sorted(set(ARCHITECTURES)))} model types, "
                         f"not {model_type!r}")
    return ARCHITECTURES[model_type]


def gguf_path(folder: Path, outtype: str) -> Path:
    """Where `compact prune --gguf` and `compact export` write: beside the checkpoint, named by type."""
    return Path(folder) / f"model-{outtype}.gguf"


WRITER_KEY = "compact.version"  # a GGUF compact wrote says so: the only kind --overwrite may replace


def check_folder(folder) -> None:
    """Refuse, before any work, a MODEL that is not a checkpoint folder (what `compact export` converts)."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"{folder} is a file; compact export converts a checkpoint folder (as compact prune writes "
                         "it: config.json, weights, tokenizer)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: {'no config.json in this folder' if folder.is_dir() else 'no such folder'}"
                                "; compact export converts a checkpoint folder (as compact prune writes it)")


def check_out(out, *, overwrite: bool) -> None:
    """Refuse, before any work, an --out the export must not write: a folder, a place in a missing folder, or an
    existing file without `overwrite`; with it, only a GGUF compact wrote (never the checkpoint's own files)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the .gguf file to write (e.g. {out}/model.gguf)")
    if not out.parent.is_dir():
        missing = next(p for p in reversed([out.parent, *out.parent.parents]) if not p.is_dir())
        raise ValueError(f"--out {out}: {missing} " + ("is a file, not a folder" if missing.exists() else
                                                      "does not exist"))
    if not out.exists():
        return
    if not overwrite:
        raise ValueError(f"{out} exists: pass --overwrite to replace it")
    if not _written_by_compact(out):
        raise ValueError(f"--out {out} exists and is not a GGUF compact wrote; --overwrite replaces only compact's "
                         f"own GGUF files: remove it yourself or choose another place")


def _written_by_compact(path: Path) -> bool:
    from .loading import gguf_strings

    try:
        return WRITER_KEY in gguf_strings(path, (WRITER_KEY,))
    except Exception:  # noqa: BLE001 - not a GGUF file at all (a checkpoint's safetensors, its JSON, ...)
        return False


def export(folder, outtype: str = "f16", out=None, pre: str | None = None) -> Path:
    """Write the checkpoint in `folder` (a Hugging Face folder with its tokenizer, as `compact prune` writes it)
    as GGUF of `outtype` to `out` (default `gguf_path(folder, outtype)`); returns the path. `pre`: llama.cpp's
    name of the pre-tokenizer (tokenizer.ggml.pre), when neither the report nor the tokenizer gives it."""
    from transformers import AutoConfig

    gguf = _gguf()
    if outtype not in GGUF_TYPES:
        raise ValueError(f"--gguf type must be one of {', '.join(GGUF_TYPES)}, got {outtype!r}")
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    arch = _architecture(config.model_type, str(folder))
    out = Path(out) if out is not None else gguf_path(folder, outtype)
    tmp = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _hyperparameters(writer, folder, config, outtype)
        _tokenizer(writer, folder, config, pre)
        _tensors(writer, folder, config, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------- hyper-parameters

def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _name(folder: Path, config) -> str:
    """general.name: the model this checkpoint was pruned from (compact_report.json's source), with "pruned", so
    two prunes of one model into two folders write the same file; else the folder's name."""
    report = folder / "compact_report.json"
    source = json.loads(report.read_text(encoding="utf-8")).get("source") if report.is_file() else None
    if not source:
        return Path(str(getattr(config, "_name_or_path", "") or folder)).name or "model"
    name = Path(str(source)).name
    return f"{name.removesuffix('.gguf')} (pruned)"


def _hyperparameters(writer, folder: Path, config, outtype: str) -> None:
    gguf = _gguf()
    writer.add_name(_name(folder, config))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(_head_dim(config))
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_types(outtype)[1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(WRITER_KEY, __version__)


def _types(outtype: str) -> tuple:
    """(the tensor type matrices are stored in, llama.cpp's file type) of an --gguf TYPE."""
    gguf = _gguf()
    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}[outtype]


def _rope_theta(config) -> float:
    return _rope(config).get("rope_theta", getattr(config, "rope_theta", 10000.0))


def _rope(config) -> dict:
    """The rope parameters (transformers 5 keeps them in `rope_parameters`, older ones in `rope_scaling`)."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def rope_factors(config) -> torch.Tensor | None:
    """Llama 3.1-style rope scaling as llama.cpp's converter writes it (the `rope_freqs` tensor), or None."""
    rope = _rope(config)
    if str(rope.get("rope_type", rope.get("type", ""))).lower() != "llama3":
        return None
    base, dim = _rope_theta(config), _head_dim(config)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- tensors

def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows (or bias entries) from Hugging Face's rotate-half order to llama.cpp's interleaved pairs (its
    converter's permute, applied to the weights and the biases alike)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensors(writer, folder: Path, config, outtype: str) -> None:
    from safetensors import safe_open

    gguf = _gguf()
    arch = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    factors = rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
    for file in sorted(folder.glob("*.safetensors")):
        if file.name.startswith("compact_"):
            continue  # compact_scores.safetensors: not a model tensor
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                weight = f.get_tensor(name).float()
                if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                    heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                    weight = _permute(weight, heads)
                target = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise ValueError(f"{folder}: tensor {name} has no llama.cpp name for the {arch} architecture")
                _add(writer, target, weight.numpy(), outtype)


def _add(writer, name: str, data: np.ndarray, outtype: str) -> None:
    """One tensor: 1-D ones (norms, biases) in float32 as llama.cpp keeps them; matrices in `outtype` (Q8_0 needs
    rows of a multiple of 32 values: other matrices fall back to F16, as the converter does)."""
    gguf = _gguf()
    data = np.ascontiguousarray(data)
    qtype = _types(outtype)[0]
    if data.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
        qtype = gguf.GGMLQuantizationType.F16
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


# ------------------------------------------------------------------------------------------- tokenizer

def _tokenizer(writer, folder: Path, config, pre: str | None) -> None:
    """The vocabulary the way llama.cpp's converter writes it, from the cut tokenizer; kind and pre-tokenizer
    from the source (compact_report.json's `gguf_tokenizer`, else recognised; `pre` names the latter)."""
    from transformers import AutoTokenizer

    gguf = _gguf()
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} has no tokenizer.json: GGUF carries the tokenizer, so export needs it")
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    kind, pre = source_tokenizer(folder, spec, pre)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(spec["model"].get("merges") or []):
        ranks.setdefault("".join(merge_pair(merge)), rank)  # a token several merges make is scored by the first
    tokens, types, scores = [], [], []
    for i in range(config.vocab_size):
        token = vocab.get(i)
        if token is None:  # embedding rows no token reaches (padding rows)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            byte = kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            types.append(gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL)
        scores.append(-float(ranks[token]) if token in ranks else (-1000.0 if i in added else 0.0))
    if kind == "llama" and tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "llama":  # SentencePiece: llama.cpp merges by score, the higher first (merge rank order)
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_prefix_space(spec))
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_special_token.update(_adds_special(tokenizer))
    special.add_to_gguf(writer, quiet=True)


def _adds_special(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer puts BOS before and EOS after a text, as it behaves (tokenizer_config.json's
    add_bos_token is often absent, and llama.cpp's default for a missing key is its own)."""
    ids = tokenizer("a").input_ids
    return {"bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
            "eos": tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1:] == [tokenizer.eos_token_id]}


def _prefix_space(spec: dict) -> bool:
    """Whether the SentencePiece tokenizer puts ▁ before the text (Metaspace prepend, or a Prepend normalizer)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text or '"Prepend"' in text


def source_tokenizer(folder: Path, spec: dict, pre: str | None = None) -> tuple[str, str]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) of the model this checkpoint was pruned from: what the report
    recorded from a GGUF source, else read from the tokenizer (byte-level BPE: the pre-tokenizer named by its split
    pattern, as transformers' GGUF reader names them, or `pre`; SentencePiece BPE: llama, default)."""
    report = folder / "compact_report.json"
    recorded = json.loads(report.read_text(encoding="utf-8")).get("gguf_tokenizer") if report.is_file() else None
    if recorded:
        return recorded["model"], pre or recorded["pre"]
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{folder}: a {model.get('type')} tokenizer; GGUF export writes BPE tokenizers "
                         "(byte-level, or SentencePiece BPE with byte fallback)")
    if model.get("byte_fallback"):
        return "llama", pre or "default"
    return "gpt2", pre or _pre_name(folder, spec)


def _pre_name(folder: Path, spec: dict) -> str:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    node = spec.get("pre_tokenizer") or {}
    patterns = _regexes(node)
    for name in (*CANONICAL_PRE, *GGUF_PRE_TOKENIZER_SPLITS):  # several names share a pattern: the converter's first
        if GGUF_PRE_TOKENIZER_SPLITS.get(name) in patterns:
            return name
    if node.get("type") == "ByteLevel" and node.get("use_regex", True):
        return "gpt-2"  # ByteLevel alone: the GPT-2 split
    raise ValueError(f"{folder}: llama.cpp has no name this export recognises for its pre-tokenizer "
                     f"({json.dumps(node)[:160]}); name it with --gguf-pre (llama.cpp's tokenizer.ggml.pre of the "
                     "source model, e.g. smollm, llama-bpe, qwen2)")


def _regexes(node) -> list[str]:
    """Every Split pattern in a pre-tokenizer tree."""
    if isinstance(node, dict):
        own = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in node.get("pattern", {}) else []
        return own + [r for v in node.values() for r in _regexes(v)]
    if isinstance(node, list):
        return [r for v in node for r in _regexes(v)]
    return []
