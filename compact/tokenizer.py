"""Tokenizer surgery: cut a fast BPE tokenizer to the kept ids, renumbered, so it never emits a dropped id.

The `tokenizers` JSON is rewritten: the BPE vocabulary is restricted and renumbered, a merge survives only when
both parts and its result are kept, added tokens, post-processor and padding ids are renumbered, and the
transformers wrapper's settings carry over. Which ids to keep is `compact.vocab`'s business.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import convert_slow_tokenizer

SUPPORTED = (
    "byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) or SentencePiece BPE with byte fallback "
    "(Llama 2, Mistral, TinyLlama, Gemma)"
)
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


def prune_tokenizer(tokenizer, kept_ids: list[int]):
    """A new ``PreTrainedTokenizerFast`` whose token i is the old token ``kept_ids[i]``.

    Rewrites the ``tokenizers`` JSON: the BPE vocabulary is restricted and renumbered, a merge survives
    only when both parts and its result are kept, and added tokens, post-processor and padding ids are
    renumbered. Special-token attributes, chat template and other settings carry over; a special token
    that ``kept_ids`` drops is unset rather than re-added under a new id.
    """
    tokenizer = as_fast(tokenizer)
    check_supported(tokenizer.backend_tokenizer)
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


def as_fast(tokenizer):
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


def component_state(component) -> dict:
    """The JSON of a tokenizers component (pre-tokenizer, decoder, ...); {} when there is none."""
    return json.loads(component.__getstate__()) if component is not None else {}


def steps_of(state: dict) -> list[dict]:
    """The steps of a component that may be a Sequence of steps."""
    for key in ("pretokenizers", "decoders"):
        if key in state:
            return [part for sub in state[key] for part in steps_of(sub)]
    return [state]


def is_byte_level(backend) -> bool:
    """Whether the pre-tokenizer maps text to the 256 byte symbols (GPT-2 style byte-level BPE)."""
    return any(p.get("type") == "ByteLevel" for p in steps_of(component_state(backend.pre_tokenizer)))


def check_supported(backend) -> None:
    """Raise unless the backend is BPE that can spell any text (byte-level, or with byte fallback)."""
    model = backend.model
    kind = type(model).__name__
    if kind != "BPE" or not (model.byte_fallback or is_byte_level(backend)):
        detail = "BPE without byte-level pre-tokenizer or byte fallback" if kind == "BPE" else kind
        raise ValueError(f"unsupported tokenizer type {detail!r}; vocabulary pruning supports {SUPPORTED}")
    if model.continuing_subword_prefix or model.end_of_word_suffix:
        raise ValueError(f"BPE with a subword prefix/suffix is not supported; vocabulary pruning supports {SUPPORTED}")


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


def merge_pair(merge) -> tuple[str, str]:
    """The two parts of a BPE merge as tokenizer.json stores it ("a b", or [a, b] in newer files)."""
    left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
    return left, right


def _merge_kept(merge, vocab: dict[str, int]) -> bool:
    """Whether both parts of a merge and its result are kept tokens."""
    left, right = merge_pair(merge)
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
