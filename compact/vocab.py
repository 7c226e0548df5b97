"""Vocabulary selection for COMPACT vocabulary pruning (the tokenizer is cut by `compact.tokenizer`).

In BPE vocabularies a regular token's id is (close to) its merge rank and later merges are rarer, so
keeping the ``keep`` lowest regular ids needs no data and keeps the tokenizer consistent: a merge only
builds a token from lower-ranked parts. The embedding and LM-head rows are sliced to the kept ids
(new id i = old id ``kept_ids[i]``) and `compact.tokenizer.prune_tokenizer` cuts the tokenizer to match, so it
never emits a dropped id.

Frequency order (:func:`select_vocab_by_frequency`, ``--vocab-order frequency``) instead keeps the tokens a
calibration corpus uses most (:func:`count_tokens`), closed under merge ancestry so that every kept merged
token can still be built by the pruned tokenizer.

Supported: BPE tokenizers that can encode any text, i.e. byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
and SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama, Gemma), as fast tokenizers.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from . import models
from .progress import bar as progress_bar
from .tokenizer import (as_fast, check_supported, component_state, is_byte_level, merge_pair, special_token_ids,
                        steps_of)

_BYTE_FALLBACK_PIECES = [f"<0x{b:02X}>" for b in range(256)]
_ASCII_CHARS = ["\t", "\n", *map(chr, range(0x21, 0x7F))]  # single-character tokens kept in every order
_COUNT_BATCH_CHARS = 1 << 20  # characters of text count_tokens tokenizes per batch
def select_vocab(tokenizer, num_embeddings: int, keep: int, *, extra_ids=(), always=()) -> list[int]:
    """Ascending old ids to keep: the ``keep`` lowest regular ids, every special/added id and ``extra_ids``,
    and the ``always`` token strings with the merge ancestors they need (unknown ones raise ValueError).

    Also always kept, so that any text still encodes losslessly: the base symbols (the 256 byte tokens
    of byte-level BPE, or the byte-fallback pieces ``<0x00>``..``<0xFF>`` and the ``▁`` the decoder
    turns into a space), the single-character tokens of printable ASCII (digits and punctuation spell
    common text), and every single-character token a kept token is spelled with (SentencePiece
    BPE puts its characters at the end of the vocabulary, yet its merges start from them). So the result
    can hold a few more ids than ``keep`` plus the specials. ``tokenizer=None`` means every embedding
    row is a regular token. Rows at or beyond the tokenizer's length (padding rows) and ids >=
    ``num_embeddings`` are never kept.
    """
    extra = _flat_ids(extra_ids)
    always = [always] if isinstance(always, str) else list(always)
    if tokenizer is not None:
        tokenizer = as_fast(tokenizer)
    elif always:
        raise ValueError("--vocab-always needs a tokenizer: its token strings name tokens through it")
    vocab, valid, regular, forced = _partition(tokenizer, num_embeddings)
    _check_keep(keep, len(regular))
    kept = set(regular[:keep])
    if always:
        _add_always(tokenizer, always, num_embeddings, (kept, forced, set(regular)),
                    _MergeTree(tokenizer.backend_tokenizer))
    if tokenizer is not None:
        forced |= _alphabet_ids(tokenizer.convert_ids_to_tokens(sorted(kept - forced)), vocab)
    return sorted((kept | forced | extra) & valid)


def count_tokens(tokenizer, texts_or_ids, *, num_embeddings: int, progress: bool | None = None) -> torch.Tensor:
    """How often each token id occurs in a corpus: an int64 ``[num_embeddings]`` tensor on the CPU.

    ``texts_or_ids`` is an iterable (or one item) of either kind, mixed freely:
    - ``str``: text, tokenized by ``tokenizer`` without special tokens (no bos/eos), in batches of about
      1M characters; each string is tokenized as a whole (pass documents or paragraphs, not one huge string).
      A text token at or beyond ``num_embeddings`` (an added token without an embedding row, such as
      Llama 3.2's ``<|image|>`` written out in the text) is not counted.
    - token ids: an int tensor, numpy array or list of any shape. Every id must lie in ``[0, num_embeddings)``
      (else ValueError). Padding counts like any id, so pass only real positions (``ids[mask.bool()]``).
    The iterable is consumed once, item by item, so a corpus of any size streams through. Ids are counted
    with ``torch.bincount`` on the device of the first id tensor (the GPU when the ids are there; one copy
    back at the end). ``progress`` shows a tqdm bar of counted tokens (None: only on a terminal).
    """
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings}")
    if isinstance(texts_or_ids, (str, torch.Tensor, np.ndarray)):
        texts_or_ids = [texts_or_ids]
    counts = None
    texts: list[str] = []
    chars = 0
    with progress_bar(unit="tok", desc="counting tokens", progress=progress) as bar:

        def add(ids: torch.Tensor, from_text: bool) -> None:
            nonlocal counts
            if counts is None:
                counts = torch.zeros(num_embeddings, dtype=torch.int64, device=ids.device)
            ids = ids.to(counts.device, non_blocking=True)
            if from_text:
                ids = ids[ids < num_embeddings]
            elif ids.numel():
                lo, hi = (int(v) for v in torch.aminmax(ids))
                if lo < 0 or hi >= num_embeddings:
                    raise ValueError(f"token ids must lie in [0, {num_embeddings}), found min {lo} and max {hi}")
            counts += torch.bincount(ids, minlength=num_embeddings)
            bar.update(ids.numel())

        def flush() -> None:
            nonlocal chars
            if texts:
                add(_encode_texts(tokenizer, texts), from_text=True)
                texts.clear()
                chars = 0

        for item in texts_or_ids:
            if isinstance(item, str):
                if tokenizer is None:
                    raise ValueError("counting tokens of text needs a tokenizer (or pass token ids)")
                texts.append(item)
                chars += len(item)
                if chars >= _COUNT_BATCH_CHARS:
                    flush()
            else:
                add(_id_tensor(item), from_text=False)
        flush()
    if counts is None:
        return torch.zeros(num_embeddings, dtype=torch.int64)
    return counts.cpu()


def select_vocab_by_frequency(tokenizer, num_embeddings: int, keep: int, counts, *, always=(),
                              extra_ids=()) -> list[int]:
    """Ascending old ids to keep: the ``keep`` most frequent regular tokens, closed under merge ancestry.

    ``counts`` (``[num_embeddings]``, e.g. from :func:`count_tokens` on calibration text) ranks the regular
    tokens, ties to the lower id. The selection starts from the tokens kept whatever the order (the base
    symbols :func:`select_vocab` keeps: byte tokens or byte-fallback pieces and ``▁``), then the ``always``
    token strings (as the vocabulary spells them, e.g. ``"Ġthe"``; unknown ones raise ValueError) with their
    ancestors, then walks the tokens by descending count and adds each one together with its missing merge
    ancestors while the regular tokens kept stay <= ``keep``; a token whose ancestors would overflow is
    skipped (and retried once other tokens have brought in its ancestors). So every kept merged token can
    still be built by the pruned tokenizer, and exactly ``keep`` regular tokens are kept, the base symbols
    among them, unless those and the ``always`` tokens alone are more. A token's parents are the two parts
    of the last merge BPE applies when it encodes the token's own string (the path the tokenizer takes;
    the first merge producing the token when BPE cannot build it from its string). Every special/added id
    and ``extra_ids`` are kept on top, as in :func:`select_vocab`; ids >= ``num_embeddings`` never are.

    ``tokenizer=None`` (a model without a tokenizer): every row is a regular token, the ``keep`` most
    frequent rows plus ``extra_ids`` are kept, and ``always`` must be empty.
    """
    extra = _flat_ids(extra_ids)
    counts = _check_counts(counts, num_embeddings)
    always = [always] if isinstance(always, str) else list(always)
    if tokenizer is None:
        if always:
            raise ValueError("--vocab-always needs a tokenizer: its token strings name tokens through it")
        _check_keep(keep, num_embeddings)
        kept = set(_by_count(counts, list(range(num_embeddings)))[:keep])
        return sorted(kept | {i for i in extra if 0 <= i < num_embeddings})
    tokenizer = as_fast(tokenizer)
    vocab, valid, regular, forced = _partition(tokenizer, num_embeddings)
    _check_keep(keep, len(regular))
    allowed = set(regular)
    tree = _MergeTree(tokenizer.backend_tokenizer)
    kept = forced & allowed  # regular ids kept so far; the base symbols count towards keep
    _add_always(tokenizer, always, num_embeddings, (kept, forced, allowed), tree)
    pending = [i for i in _by_count(counts, regular) if i not in kept]
    while len(kept) < keep and pending:
        before, skipped = len(kept), []
        for token_id in pending:
            if len(kept) >= keep:
                break
            if token_id in kept:
                continue
            add = tree.closure(token_id, kept, allowed)
            if add is None:
                continue  # an ancestor has no embedding row: the token can never be kept consistently
            if len(kept) + len(add) <= keep:
                kept.update(add)
            else:
                skipped.append(token_id)
        if len(kept) == before:
            break
        pending = skipped
    kept |= _alphabet_ids(tokenizer.convert_ids_to_tokens(sorted(kept - forced)), vocab)  # no-op: safety net
    return sorted((kept | forced | extra) & valid)


def frequency_keep_order(tokenizer, num_embeddings: int, counts, *, always=()) -> list[int]:
    """Regular ids in the order frequency selection takes them, with no budget: the base symbols, the
    ``always`` tokens with their ancestors, then each token by descending count preceded by its missing
    ancestors. Keeping a prefix of N of these approximates ``select_vocab_by_frequency(keep=N)`` (which also
    fills the room a too-large last group leaves); the budget planner prices vocabulary cuts along it."""
    counts = _check_counts(counts, num_embeddings)
    if tokenizer is None:
        return _by_count(counts, list(range(num_embeddings)))
    tokenizer = as_fast(tokenizer)
    vocab, _, regular, forced = _partition(tokenizer, num_embeddings)
    allowed, tree = set(regular), _MergeTree(tokenizer.backend_tokenizer)
    order = sorted(forced & allowed)
    kept = set(order)
    for token_id in [*_always_ids(tokenizer, vocab, list(always), num_embeddings), *_by_count(counts, regular)]:
        add = tree.closure(token_id, kept, allowed)
        if add:
            order += reversed(add)  # ancestors before the token
            kept.update(add)
    return order


VOCAB_ORDERS = ("id", "frequency")


def regular_ids(tokenizer, num_embeddings: int) -> list[int]:
    """Ids of the regular (non-special) tokens that have embedding rows, ascending."""
    if tokenizer is None:
        return list(range(num_embeddings))
    specials = set(special_token_ids(tokenizer))
    return sorted(i for i in tokenizer.get_vocab().values() if i < num_embeddings and i not in specials)


def kept_vocabulary(model, tokenizer, vocab_keep: int | None, *, order: str = "id", counts=None,
                    always=()) -> list[int] | None:
    """The vocabulary policy: ascending old ids to keep (id order: the lowest regular ids; frequency order: the
    most frequent, closed under merge ancestry; the config's token ids in both), or None when not cut."""
    if order not in VOCAB_ORDERS:
        raise ValueError(f"--vocab-order must be one of {', '.join(VOCAB_ORDERS)}, got {order!r}")
    if vocab_keep is None:
        if always:
            raise ValueError("--vocab-always names tokens to keep when the vocabulary is cut: give --vocab-keep "
                             "(or --target-params)")
        return None
    rows = model.get_input_embeddings().num_embeddings
    extra = models.config_token_ids(model)
    if order == "frequency":
        return select_vocab_by_frequency(tokenizer, rows, vocab_keep, counts, always=always, extra_ids=extra)
    kept = select_vocab(tokenizer, rows, vocab_keep, extra_ids=extra, always=always)
    if tokenizer is None:
        warnings.warn("no tokenizer: id order assumes later ids are rarer, which need not hold here "
                      "(SentencePiece puts its 256 byte pieces first); --vocab-order frequency measures it",
                      stacklevel=2)
    return kept


def keep_curve(tokenizer, num_embeddings: int, order: str, counts=None, *, always=()) -> tuple[list[int], list[int]]:
    """(ids, prefix): the regular ids in the order a growing cut keeps them, and for every ``keep`` N in
    0..regular, ``prefix[N]`` = how many of them :func:`kept_vocabulary` keeps at N (its cut plus the tokens
    kept whatever N: base symbols, ``always`` with their ancestors, the characters kept tokens are spelled
    with). Exact in id order; in frequency order ``ids`` is :func:`frequency_keep_order`, which the selection
    follows up to the room a too-large last group leaves. The budget planner prices cuts along it."""
    if order == "frequency":
        ids = frequency_keep_order(tokenizer, num_embeddings, counts, always=always)
        start = 0 if tokenizer is None else len(_initial(as_fast(tokenizer), num_embeddings, always))
        return ids, [max(n, start) for n in range(len(ids) + 1)]
    if tokenizer is None:
        return list(range(num_embeddings)), list(range(num_embeddings + 1))
    tokenizer = as_fast(tokenizer)
    vocab, _, regular, _ = _partition(tokenizer, num_embeddings)
    allowed = set(regular)
    names = {i: t for t, i in vocab.items()}
    ids, kept = [], set()

    def add(token_id: int) -> None:
        for new in [*sorted(_alphabet_ids([names[token_id]], vocab)), token_id]:
            if new in allowed and new not in kept:
                ids.append(new)
                kept.add(new)

    for token_id in sorted(_initial(tokenizer, num_embeddings, always)):
        add(token_id)
    prefix = [len(ids)]
    for token_id in regular:
        add(token_id)
        prefix.append(len(ids))
    return ids, prefix


def _initial(tokenizer, num_embeddings: int, always) -> set[int]:
    """The regular ids kept whatever the cut: base symbols, and the ``always`` tokens with their ancestors."""
    _, _, regular, forced = _partition(tokenizer, num_embeddings)
    allowed = set(regular)
    kept = forced & allowed
    if always:  # the merge tree is costly to build and only the always tokens need it
        _add_always(tokenizer, list(always), num_embeddings, (kept, forced, allowed),
                    _MergeTree(tokenizer.backend_tokenizer))
    return kept


def read_always_file(path) -> list[str]:
    """The token strings of a ``--vocab-always`` file: one per line, spelled as the vocabulary spells them
    (``Ġthe`` in byte-level BPE, ``▁the`` in SentencePiece). UTF-8; the line break (``\\n`` or ``\\r\\n``) is
    not part of the token, any other character is; lines of only whitespace are skipped; duplicates dropped.
    Raises FileNotFoundError or ValueError with one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --vocab-always file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: --vocab-always file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))
    tokens = list(dict.fromkeys(line for line in lines if line.strip()))
    if not tokens:
        raise ValueError(f"{path}: --vocab-always file holds no token strings (expected one per line)")
    return tokens


def _flat_ids(values) -> set[int]:
    """The ids in ``values``, flattening lists (a config's eos_token_id can be one) and skipping None."""
    flat = set()
    for value in values:
        if isinstance(value, (list, tuple)):
            flat |= _flat_ids(value)
        elif value is not None:
            flat.add(int(value))
    return flat


def _base_symbol_ids(tokenizer, vocab: dict[str, int]) -> set[int]:
    """Ids of the tokens needed to spell any text well: byte tokens, symbols the decoder rewrites, and the
    single-character tokens of printable ASCII (digits, punctuation, letters) with tab and newline.

    A symbol such as SentencePiece's ``▁`` must stay a token: spelled with byte-fallback pieces it
    would skip the decoder's ``▁`` -> space step and decode as a literal ``▁``. The ASCII characters matter
    where a vocabulary has them at high ids (Llama 2's digits are 29896-29955) and splits text into them
    ("1993" is ``▁ 1 9 9 3``): dropped, they fall back to byte pieces the model never saw.
    """
    backend = tokenizer.backend_tokenizer
    check_supported(backend)
    pieces = list(_BYTE_FALLBACK_PIECES) if backend.model.byte_fallback else []
    if is_byte_level(backend):
        pieces += bytes_to_unicode().values()
    pieces += _ASCII_CHARS
    for step in steps_of(component_state(backend.decoder)):
        pieces += [step.get("pattern", {}).get("String"), step.get("replacement")]
    return {vocab[p] for p in pieces if p in vocab}


def _alphabet_ids(tokens: list[str], vocab: dict[str, int]) -> set[int]:
    """Ids of the single-character tokens the given tokens are spelled with (BPE merges start from them)."""
    chars = set().union(*map(set, tokens))
    return {vocab[c] for c in chars if c in vocab}


def _partition(tokenizer, num_embeddings: int) -> tuple[dict[str, int], set[int], list[int], set[int]]:
    """(vocab, ids with an embedding row, regular ids ascending, ids always kept) of a fast tokenizer or None."""
    if tokenizer is None:
        return {}, set(range(num_embeddings)), list(range(num_embeddings)), set()
    vocab = tokenizer.get_vocab()
    specials = set(special_token_ids(tokenizer))
    valid = {i for i in vocab.values() if i < num_embeddings}
    if not valid - specials:
        raise ValueError(f"the tokenizer does not fit the model: none of its {len(vocab)} tokens is a regular "
                         f"(non-special) token with an id below the model's {num_embeddings} embedding rows; "
                         "give the model's own tokenizer (--tokenizer)")
    return vocab, valid, sorted(valid - specials), specials | _base_symbol_ids(tokenizer, vocab)


def check_keep(tokenizer, num_embeddings: int, keep: int | None) -> None:
    """Refuse a --vocab-keep outside 1..the regular token count (or a tokenizer that does not fit the model)
    from the tokenizer alone, before any model weight is read; None (no vocabulary cut) passes."""
    if keep is not None:
        _check_keep(keep, len(_partition(None if tokenizer is None else as_fast(tokenizer), num_embeddings)[2]))


def _check_keep(keep: int, regular: int) -> None:
    if not 1 <= keep <= regular:
        raise ValueError(f"--vocab-keep must be between 1 and {regular} (the number of regular tokens), got {keep}")


def _encode_texts(tokenizer, texts: list[str]) -> torch.Tensor:
    """All ids of ``texts`` without special tokens, concatenated (a `tokenizers.Tokenizer` or a transformers one)."""
    if hasattr(tokenizer, "encode_batch"):
        ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.from_numpy(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64))


def _id_tensor(item) -> torch.Tensor:
    """Token ids (tensor, numpy array, list) as a flat int64 tensor on their device; TypeError for non-integers."""
    if isinstance(item, np.ndarray):
        ids = torch.from_numpy(np.asarray(item, dtype=np.int64)) if item.dtype.kind in "iu" else None
    else:
        ids = torch.as_tensor(item)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            ids = None
    if ids is None:
        dtype = getattr(item, "dtype", type(item).__name__)
        raise TypeError(f"count_tokens expects text (str) or integer token ids, got {dtype}")
    return ids.reshape(-1).long()


def _check_counts(counts, num_embeddings: int) -> torch.Tensor:
    """``counts`` as a 1-D CPU tensor of ``num_embeddings`` real numbers."""
    counts = torch.as_tensor(counts).detach().cpu()
    if counts.shape != (num_embeddings,) or counts.is_complex() or counts.dtype == torch.bool:
        raise ValueError(f"counts must be a 1-D tensor of {num_embeddings} numbers (one per embedding row), "
                         f"got {counts.dtype} of shape {list(counts.shape)}")
    return counts


def _by_count(counts: torch.Tensor, ids: list[int]) -> list[int]:
    """``ids`` by descending count, ties in the given (ascending id) order."""
    index = torch.as_tensor(ids, dtype=torch.long)
    order = torch.sort(counts[index], descending=True, stable=True).indices
    return index[order].tolist()


def _add_always(tokenizer, always: list, num_embeddings: int, sets: tuple[set, set, set], tree) -> None:
    """Add the ``--vocab-always`` tokens and the merge ancestors they need to the kept set (in place);
    ``sets`` = (kept, forced, allowed)."""
    kept, forced, allowed = sets
    for token, token_id in zip(always, _always_ids(tokenizer, tokenizer.get_vocab(), always, num_embeddings)):
        if token_id in forced:
            continue
        add = tree.closure(token_id, kept, allowed)
        if add is None:
            raise ValueError(f"--vocab-always: {token!r} is built from a token without an embedding row")
        kept.update(add)


def _always_ids(tokenizer, vocab: dict[str, int], always: list, num_embeddings: int) -> list[int]:
    """The ids of the ``--vocab-always`` token strings; ValueError naming the first unknown one."""
    ids = []
    for token in always:
        if not isinstance(token, str):
            raise TypeError(f"--vocab-always expects token strings, got {token!r}")
        if token not in vocab:
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(token, add_special_tokens=False).input_ids)
            raise ValueError(f"--vocab-always: {token!r} is not a token of the tokenizer; write tokens as the "
                             f"vocabulary spells them (this text encodes as {pieces[:8]})")
        if vocab[token] >= num_embeddings:
            raise ValueError(f"--vocab-always: {token!r} is id {vocab[token]}, which has no embedding row "
                             f"(the model has {num_embeddings})")
        ids.append(vocab[token])
    return ids


class _MergeTree:
    """Merge ancestry of a BPE model's tokens, computed lazily token by token.

    A merged token's parents are the two parts of the last merge BPE applies when it encodes the token's
    own string: that is how the tokenizer builds it, in any text (inside a word, the merges within a
    finished token's span are those of the token on its own). Keeping those parents (recursively) is what
    lets a pruned tokenizer still emit the token, as a pruned tokenizer applies the same merges in the same
    order. The first merge producing a token is often another split (Llama 3 and Qwen: ``Ġ the`` comes
    before the ``Ġth e`` BPE uses, for a third to 40% of their tokens); it is only the fallback for the few tokens BPE
    cannot build from their own string (never emitted). A token that no merge produces is built from its
    characters (a single character has no parents).
    """

    def __init__(self, backend):
        model = component_state(backend.model)
        self.vocab: dict[str, int] = model["vocab"]
        self.tokens = {i: t for t, i in self.vocab.items()}
        pairs = [merge_pair(m) for m in model["merges"]]
        # built back to front, so the first occurrence (lowest rank) wins
        self.ranks: dict[tuple[str, str], int] = dict(zip(reversed(pairs), range(len(pairs) - 1, -1, -1)))
        self.first: dict[str, tuple[str, str]] = {a + b: (a, b) for a, b in reversed(pairs)}
        self._parents: dict[int, tuple[int, ...]] = {}

    def parents(self, token_id: int) -> tuple[int, ...]:
        """The ids ``token_id`` is built from: two merge parts, its characters, or () (a single character)."""
        if token_id not in self._parents:
            token = self.tokens.get(token_id)
            if token is None or len(token) == 1:
                parts = ()
            elif token in self.first:
                parts = self._split(token)
            else:
                parts = tuple(c for c in dict.fromkeys(token) if c in self.vocab)
            self._parents[token_id] = tuple(self.vocab[p] for p in parts)
        return self._parents[token_id]

    def _split(self, token: str) -> tuple[str, str]:
        """The two parts BPE joins last when it encodes ``token`` alone (lowest rank first, leftmost on ties)."""
        word = list(token)
        while len(word) > 2:
            best = pos = None
            for i in range(len(word) - 1):
                rank = self.ranks.get((word[i], word[i + 1]))
                if rank is not None and (best is None or rank < best):
                    best, pos = rank, i
            if best is None:
                break
            word[pos:pos + 2] = [word[pos] + word[pos + 1]]
        if len(word) == 2 and (word[0], word[1]) in self.ranks:
            return word[0], word[1]
        return self.first[token]

    def closure(self, token_id: int, kept: set[int], allowed: set[int]) -> list[int] | None:
        """``token_id`` and its ancestors that are not in ``kept``; None when one of them is not ``allowed``."""
        out, seen, stack = [], set(), [token_id]
        while stack:
            current = stack.pop()
            if current in kept or current in seen:
                continue
            if current not in allowed:
                return None
            seen.add(current)
            out.append(current)
            stack.extend(self.parents(current))
        return out
