"""Vocabulary selection and tokenizer surgery for COMPACT vocabulary pruning.

In BPE vocabularies a regular token's id is (close to) its merge rank and later merges are rarer, so
keeping the ``keep`` lowest regular ids needs no data and keeps the tokenizer consistent: a merge only
builds a token from lower-ranked parts. The embedding and LM-head rows are sliced to the kept ids
(new id i = old id ``kept_ids[i]``) and :func:`prune_tokenizer` cuts the tokenizer to match, so it
never emits a dropped id.

Supported: BPE tokenizers that can encode any text, i.e. byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
and SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama, Gemma), as fast tokenizers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode, convert_slow_tokenizer

SUPPORTED = (
    "byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) or SentencePiece BPE with byte fallback "
    "(Llama 2, Mistral, TinyLlama, Gemma)"
)
_BYTE_FALLBACK_PIECES = [f"<0x{b:02X}>" for b in range(256)]
# init kwargs that name the original files or ids, not settings the pruned tokenizer should inherit
_STALE_KWARGS = {
    "vocab_file", "merges_file", "tokenizer_file", "vocab", "merges", "name_or_path", "is_local",
    "local_files_only", "added_tokens_decoder", "tokenizer_object", "backend", "_commit_hash",
    "additional_special_tokens", "auto_map",  # auto_map would reload the original (remote-code) class
}
# attributes a user may have changed after construction, so init_kwargs can be stale for them
_LIVE_ATTRS = ("model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces",
               "chat_template")


def special_token_ids(tokenizer) -> list[int]:
    """Ids of all special and added tokens (sorted): they are always kept, whatever their rank."""
    ids = set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
    return sorted(i for i in ids if i is not None)


def select_vocab(tokenizer, num_embeddings: int, keep: int, *, extra_ids=()) -> list[int]:
    """Ascending old ids to keep: the ``keep`` lowest regular ids, every special/added id and ``extra_ids``.

    Also always kept, so that any text still encodes losslessly: the base symbols (the 256 byte tokens
    of byte-level BPE, or the byte-fallback pieces ``<0x00>``..``<0xFF>`` and the ``▁`` the decoder
    turns into a space), and every single-character token a kept token is spelled with (SentencePiece
    BPE puts its characters at the end of the vocabulary, yet its merges start from them). So the result
    can hold a few more ids than ``keep`` plus the specials. ``tokenizer=None`` means every embedding
    row is a regular token. Rows at or beyond the tokenizer's length (padding rows) and ids >=
    ``num_embeddings`` are never kept.
    """
    extra = _flat_ids(extra_ids)
    if tokenizer is None:
        valid, regular, forced = set(range(num_embeddings)), list(range(num_embeddings)), set()
    else:
        tokenizer = _as_fast(tokenizer)
        vocab = tokenizer.get_vocab()
        specials = set(special_token_ids(tokenizer))
        valid = {i for i in vocab.values() if i < num_embeddings}
        regular = sorted(valid - specials)
        forced = specials | _base_symbol_ids(tokenizer, vocab)
    if not 1 <= keep <= len(regular):
        raise ValueError(
            f"--vocab-keep must be between 1 and {len(regular)} (the number of regular tokens), got {keep}"
        )
    kept = set(regular[:keep])
    if tokenizer is not None:
        forced |= _alphabet_ids(tokenizer.convert_ids_to_tokens(sorted(kept - forced)), vocab)
    return sorted((kept | forced | extra) & valid)


def prune_tokenizer(tokenizer, kept_ids: list[int]):
    """A new ``PreTrainedTokenizerFast`` whose token i is the old token ``kept_ids[i]``.

    Rewrites the ``tokenizers`` JSON: the BPE vocabulary is restricted and renumbered, a merge survives
    only when both parts and its result are kept, and added tokens, post-processor and padding ids are
    renumbered. Special-token attributes, chat template and other settings carry over; a special token
    that ``kept_ids`` drops is unset rather than re-added under a new id.
    """
    tokenizer = _as_fast(tokenizer)
    _check_supported(tokenizer.backend_tokenizer)
    remap = _remap(kept_ids, tokenizer)
    state = _prune_state(json.loads(tokenizer.backend_tokenizer.to_str()), remap)
    kept_tokens = set(state["model"]["vocab"]) | {tok["content"] for tok in state["added_tokens"]}
    with tempfile.TemporaryDirectory() as tmp:  # a file, not tokenizer_object, which is deep-copied (slow)
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(state), encoding="utf-8")
        pruned = PreTrainedTokenizerFast(tokenizer_file=str(path), **_wrapper_kwargs(tokenizer, kept_tokens))
    if len(pruned) != len(remap):
        raise RuntimeError(f"pruned tokenizer has {len(pruned)} tokens, expected {len(remap)}")
    return pruned


def _flat_ids(values) -> set[int]:
    """The ids in ``values``, flattening lists (a config's eos_token_id can be one) and skipping None."""
    flat = set()
    for value in values:
        if isinstance(value, (list, tuple)):
            flat |= _flat_ids(value)
        elif value is not None:
            flat.add(int(value))
    return flat


def _as_fast(tokenizer):
    """The tokenizer itself when fast, else its conversion to a fast one (the JSON rewrite needs one)."""
    if getattr(tokenizer, "is_fast", False):
        return tokenizer
    try:
        backend = convert_slow_tokenizer(tokenizer)
    except Exception as exc:
        raise ValueError(
            f"cannot convert the slow tokenizer {type(tokenizer).__name__} to a fast one; vocabulary "
            f"pruning supports {SUPPORTED}"
        ) from exc
    kwargs = _wrapper_kwargs(tokenizer, set(backend.get_vocab(with_added_tokens=True)))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _state(component) -> dict:
    """The JSON of a tokenizers component (pre-tokenizer, decoder, ...); {} when there is none."""
    return json.loads(component.__getstate__()) if component is not None else {}


def _parts(state: dict) -> list[dict]:
    """The steps of a component that may be a Sequence of steps."""
    for key in ("pretokenizers", "decoders"):
        if key in state:
            return [part for sub in state[key] for part in _parts(sub)]
    return [state]


def _is_byte_level(backend) -> bool:
    """Whether the pre-tokenizer maps text to the 256 byte symbols (GPT-2 style byte-level BPE)."""
    return any(p.get("type") == "ByteLevel" for p in _parts(_state(backend.pre_tokenizer)))


def _check_supported(backend) -> None:
    """Raise unless the backend is BPE that can spell any text (byte-level, or with byte fallback)."""
    model = backend.model
    kind = type(model).__name__
    if kind != "BPE" or not (model.byte_fallback or _is_byte_level(backend)):
        detail = "BPE without byte-level pre-tokenizer or byte fallback" if kind == "BPE" else kind
        raise ValueError(f"unsupported tokenizer type {detail!r}; vocabulary pruning supports {SUPPORTED}")
    if model.continuing_subword_prefix or model.end_of_word_suffix:
        raise ValueError(f"BPE with a subword prefix/suffix is not supported; vocabulary pruning supports {SUPPORTED}")


def _base_symbol_ids(tokenizer, vocab: dict[str, int]) -> set[int]:
    """Ids of the tokens needed to spell any text: byte tokens, plus symbols the decoder rewrites.

    A symbol such as SentencePiece's ``▁`` must stay a token: spelled with byte-fallback pieces it
    would skip the decoder's ``▁`` -> space step and decode as a literal ``▁``.
    """
    backend = tokenizer.backend_tokenizer
    _check_supported(backend)
    pieces = list(_BYTE_FALLBACK_PIECES) if backend.model.byte_fallback else []
    if _is_byte_level(backend):
        pieces += bytes_to_unicode().values()
    for step in _parts(_state(backend.decoder)):
        pieces += [step.get("pattern", {}).get("String"), step.get("replacement")]
    return {vocab[p] for p in pieces if p in vocab}


def _alphabet_ids(tokens: list[str], vocab: dict[str, int]) -> set[int]:
    """Ids of the single-character tokens the given tokens are spelled with (BPE merges start from them)."""
    chars = set().union(*map(set, tokens))
    return {vocab[c] for c in chars if c in vocab}


def _remap(kept_ids, tokenizer) -> dict[int, int]:
    """Old id -> new id, after checking ``kept_ids`` is ascending, unique and names existing tokens."""
    kept = [int(i) for i in kept_ids]
    if not kept or any(a >= b for a, b in zip(kept, kept[1:])):
        raise ValueError("kept_ids must be a non-empty, strictly ascending list of token ids")
    missing = set(kept) - set(tokenizer.get_vocab().values())
    if missing:
        raise ValueError(f"kept_ids names ids the tokenizer does not have, e.g. {sorted(missing)[:5]}")
    return {old: new for new, old in enumerate(kept)}


def _prune_state(state: dict, remap: dict[int, int]) -> dict:
    """The tokenizers JSON restricted to the kept ids and renumbered."""
    model = state["model"]
    vocab = {tok: remap[i] for tok, i in model["vocab"].items() if i in remap}
    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"] if _merge_kept(m, vocab)]
    if model.get("unk_token") not in vocab:
        model["unk_token"] = None
    state["added_tokens"] = [
        {**tok, "id": remap[tok["id"]]} for tok in state["added_tokens"] if tok["id"] in remap
    ]
    if state.get("post_processor"):
        _renumber_processor(state["post_processor"], remap)
    if state.get("padding"):
        state["padding"]["pad_id"] = _renumbered(state["padding"]["pad_id"], remap, "padding")
    return state


def _merge_kept(merge, vocab: dict[str, int]) -> bool:
    """Whether both parts of a merge ("a b" or [a, b]) and its result are kept tokens."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left in vocab and right in vocab and left + right in vocab


def _renumber_processor(proc: dict, remap: dict[int, int]) -> None:
    """Renumber, in place, the special-token ids a post-processor (or a Sequence of them) inserts."""
    for sub in proc.get("processors", []):
        _renumber_processor(sub, remap)
    for spec in proc.get("special_tokens", {}).values():  # TemplateProcessing
        spec["ids"] = [_renumbered(i, remap, spec["id"]) for i in spec["ids"]]
    for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
        if key in proc:
            proc[key][1] = _renumbered(proc[key][1], remap, proc[key][0])


def _renumbered(old: int, remap: dict[int, int], what: str) -> int:
    """The new id of ``old``; dropping a token the tokenizer inserts by itself would break it."""
    if old not in remap:
        raise ValueError(f"the tokenizer inserts {what!r} (id {old}) itself, so kept_ids must keep it")
    return remap[old]


def _wrapper_kwargs(tokenizer, kept_tokens: set[str]) -> dict:
    """Settings of the transformers wrapper to carry over; special tokens not in ``kept_tokens`` are unset."""
    kwargs = {k: v for k, v in tokenizer.init_kwargs.items() if k not in _STALE_KWARGS}
    kwargs.update({a: getattr(tokenizer, a) for a in _LIVE_ATTRS if getattr(tokenizer, a, None) is not None})
    for name in tokenizer.SPECIAL_TOKENS_ATTRIBUTES:  # includes model-specific ones such as image_token
        kwargs.pop(name, None)
        if getattr(tokenizer, name) in kept_tokens:
            kwargs[name] = getattr(tokenizer, name)
    kwargs["extra_special_tokens"] = [t for t in tokenizer.extra_special_tokens if t in kept_tokens]
    return kwargs
