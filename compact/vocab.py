"""Vocabulary selection for COMPACT vocabulary pruning (the tokenizer is cut by `compact.tokenizer`).

In BPE vocabularies a regular token's id is (close to) its merge rank and later merges are rarer, so
keeping the ``keep`` lowest regular ids needs no data and keeps the tokenizer consistent: a merge only
builds a token from lower-ranked parts. The embedding and LM-head rows are sliced to the kept ids
(new id i = old id ``kept_ids[i]``) and `compact.tokenizer.prune_tokenizer` cuts the tokenizer to match, so it
never emits a dropped id.

Frequency order (``--vocab-order frequency``) instead keeps the tokens a calibration corpus uses most
(:func:`count_tokens`), closed under merge ancestry so that every kept merged token can still be built by the
pruned tokenizer. A :class:`Vocabulary` (a tokenizer against a model's embedding rows) answers both, and the
budget planner's questions, from one partition of the tokenizer and one merge tree.

Supported: BPE tokenizers that can encode any text, i.e. byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
and SentencePiece BPE with byte fallback (Llama 2, Mistral, TinyLlama, Gemma), as fast tokenizers.
"""

from __future__ import annotations

import itertools
import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from . import models
from .options import VOCAB_ORDERS, parse_keep
from .progress import bar as progress_bar
from .tokenizer import (as_fast, check_supported, component_state, is_byte_level, merge_pair, special_token_ids,
                        steps_of)

_BYTE_FALLBACK_PIECES = [f"<0x{b:02X}>" for b in range(256)]
_ASCII_CHARS = ["\t", "\n", *map(chr, range(0x21, 0x7F))]  # single-character tokens kept in every order
_COUNT_BATCH_CHARS = 1 << 20  # characters of text count_tokens tokenizes per batch


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


class Vocabulary:
    """A tokenizer's vocabulary against a model's embedding rows: everything the vocabulary cut asks of it.

    Serves the policy (:meth:`kept`: the ids kept at N regular tokens, in id or frequency order), the budget
    planner's curve (:meth:`keep_curve`, :attr:`base_rows`) and the ``--vocab-keep`` check (:meth:`check_keep`).
    Building it costs nothing; the partition (regular, special and base-symbol ids) is computed on first need
    and the merge tree (frequency order, ``always`` tokens) likewise, each once, however many cuts are asked.

    ``tokenizer=None`` means every embedding row is a regular token. ``extra_ids`` (the config's token ids,
    :meth:`of`; lists are flattened, None skipped) are kept in every cut. Rows at or beyond the tokenizer's
    length (padding rows) and ids >= ``num_embeddings`` are never kept.
    """

    def __init__(self, tokenizer, num_embeddings: int, *, extra_ids=()):
        self._source = tokenizer
        self.num_embeddings = num_embeddings
        self.extra_ids = _flat_ids(extra_ids)

    @classmethod
    def of(cls, model, tokenizer) -> Vocabulary:
        """The vocabulary of ``model`` as it stands (its embedding rows, its config's token ids) via ``tokenizer``."""
        return cls(tokenizer, model.get_input_embeddings().num_embeddings, extra_ids=models.config_token_ids(model))

    @cached_property
    def tokenizer(self):
        """The fast tokenizer (a slow one converted), or None."""
        return None if self._source is None else as_fast(self._source)

    @cached_property
    def _parts(self) -> tuple[dict[str, int], set[int], list[int], set[int]]:
        return _partition(self.tokenizer, self.num_embeddings)

    @property
    def regular(self) -> list[int]:
        """Ids of the regular (non-special) tokens that have embedding rows, ascending."""
        return self._parts[2]

    @cached_property
    def _allowed(self) -> set[int]:
        return set(self.regular)

    @cached_property
    def _tree(self) -> _MergeTree:
        return _MergeTree(self.tokenizer.backend_tokenizer)

    @property
    def base_rows(self) -> int:
        """Rows every cut keeps besides regular tokens: the special and added tokens and ``extra_ids`` with a row."""
        _, valid, _, forced = self._parts
        return len(((forced | self.extra_ids) & valid) - self._allowed)

    def keep_count(self, keep: float | str | None) -> int | None:
        """--vocab-keep as a count of regular tokens: a count as it is, a ratio of the regular tokens rounded (at
        least one); None (no vocabulary cut) stays None. The one place a ratio meets the vocabulary."""
        if keep is None:
            return None
        number = parse_keep(keep, "--vocab-keep")
        return max(1, round(number * len(self.regular))) if isinstance(number, float) else number

    def check_keep(self, keep: float | str | None) -> None:
        """Refuse a --vocab-keep outside 1..the regular token count (or a tokenizer that does not fit the model),
        from the tokenizer alone, before any weight is read; None (no vocabulary cut) passes."""
        count = self.keep_count(keep)
        if count is not None and not 1 <= count <= len(self.regular):
            raise ValueError(f"--vocab-keep must be between 1 and {len(self.regular)} (the number of regular "
                             f"tokens), got {keep}")

    def kept(self, keep: int | None, *, order: str = "id", counts=None, always=(),
             prior: float = 0.0) -> list[int] | None:
        """The vocabulary policy: ascending old ids to keep, or None when ``keep`` is None (no cut).

        Id order keeps the ``keep`` lowest regular ids, frequency order the ``keep`` most frequent by ``counts``
        (``[num_embeddings]``, e.g. from :func:`count_tokens`; blended with the tokenizer's prior by a weight
        ``prior``, :meth:`blend`), closed under merge ancestry; both add every
        special/added id, ``extra_ids``, the base symbols, and the ``always`` token strings (as the vocabulary
        spells them, e.g. ``"Ġthe"``; unknown ones raise ValueError) with the merge ancestors they need.
        """
        if order not in VOCAB_ORDERS:
            raise ValueError(f"--vocab-order must be one of {', '.join(VOCAB_ORDERS)}, got {order!r}")
        always = [always] if isinstance(always, str) else list(always)
        if keep is None:
            if always:
                raise ValueError("--vocab-always names tokens to keep when the vocabulary is cut: give --vocab-keep "
                                 "(or --target-params)")
            return None
        if order == "frequency":
            return self._by_frequency(keep, self.blend(counts, prior), always)
        kept = self._by_id(keep, always)
        if self.tokenizer is None:
            warnings.warn("no tokenizer: id order assumes later ids are rarer, which need not hold here "
                          "(SentencePiece puts its 256 byte pieces first); --vocab-order frequency measures it",
                          stacklevel=2)
        return kept

    def _by_id(self, keep: int, always: list) -> list[int]:
        """The ``keep`` lowest regular ids, the ids every cut keeps, and the ``always`` tokens with their ancestors.

        Also kept, so that any text still encodes losslessly: the base symbols (the 256 byte tokens of byte-level
        BPE, or the byte-fallback pieces ``<0x00>``..``<0xFF>`` and the ``▁`` the decoder turns into a space), the
        single-character tokens of printable ASCII (digits and punctuation spell common text), and every
        single-character token a kept token is spelled with (SentencePiece BPE puts its characters at the end of
        the vocabulary, yet its merges start from them). So the result can hold a few more ids than ``keep``
        plus the specials.
        """
        self._check_always(always)
        vocab, valid, regular, forced = self._parts
        self.check_keep(keep)
        kept = set(regular[:keep])
        forced = set(forced)
        if always:
            self._add_always(always, kept, forced)
        if self.tokenizer is not None:
            forced |= _alphabet_ids(self.tokenizer.convert_ids_to_tokens(sorted(kept - forced)), vocab)
        return sorted((kept | forced | self.extra_ids) & valid)

    def _by_frequency(self, keep: int, counts: torch.Tensor, always: list) -> list[int]:
        """The ``keep`` most frequent regular tokens (ties to the lower id), closed under merge ancestry, and the
        ids every cut keeps.

        Starts from the base symbols :meth:`_by_id` keeps and the ``always`` tokens with their ancestors, then
        walks the tokens by descending count and adds each one together with its missing merge ancestors while
        the regular tokens kept stay <= ``keep``; a token whose ancestors would overflow is skipped (and retried
        once other tokens have brought in its ancestors). So every kept merged token can still be built by the
        pruned tokenizer, and exactly ``keep`` regular tokens are kept, the base symbols among them, unless those
        and the ``always`` tokens alone are more. A token's parents are the two parts of the last merge BPE
        applies when it encodes the token's own string (see :class:`_MergeTree`). With no tokenizer the ``keep``
        most frequent rows are kept.
        """
        self._check_always(always)
        if self.tokenizer is None:
            self.check_keep(keep)
            kept = set(_by_count(counts, self.regular)[:keep])
            return sorted(kept | (self.extra_ids & self._parts[1]))
        vocab, valid, regular, forced = self._parts
        self.check_keep(keep)
        kept = forced & self._allowed  # regular ids kept so far; the base symbols count towards keep
        self._add_always(always, kept, forced)
        pending = [i for i in _by_count(counts, regular) if i not in kept]
        while len(kept) < keep and pending:
            before, skipped = len(kept), []
            for token_id in pending:
                if len(kept) >= keep:
                    break
                if token_id in kept:
                    continue
                add = self._tree.closure(token_id, kept, self._allowed)
                if add is None:
                    continue  # an ancestor has no embedding row: the token can never be kept consistently
                if len(kept) + len(add) <= keep:
                    kept.update(add)
                else:
                    skipped.append(token_id)
            if len(kept) == before:
                break
            pending = skipped
        # the characters of tokens built on a multi-character base symbol (a decoder's Replace string): the
        # closure stops at that kept symbol, so it does not reach the characters it is spelled with
        kept |= _alphabet_ids(self.tokenizer.convert_ids_to_tokens(sorted(kept - forced)), vocab)
        return sorted((kept | forced | self.extra_ids) & valid)

    def keep_curve(self, order: str, counts=None, *, always=(), prior: float = 0.0) -> tuple[list[int], list[int]]:
        """(ids, prefix): the regular ids in the order a growing cut keeps them, and for every ``keep`` N in
        0..len(ids), ``prefix[N]`` = how many of them :meth:`kept` keeps at N (its cut plus the tokens kept
        whatever N: base symbols, ``always`` with their ancestors, the characters kept tokens are spelled
        with); the rows kept are ``prefix[N] + base_rows``. Exact in id order; in frequency order ``ids`` is
        the order the selection takes tokens in with no budget (the base symbols, the ``always`` tokens with
        their ancestors, then each token by descending count preceded by its missing ancestors), which it
        follows up to the room a too-large last group leaves (``prior``: :meth:`blend`'s weight). The budget
        planner prices cuts along it."""
        always = [always] if isinstance(always, str) else list(always)
        if order == "frequency":
            ids = self._frequency_order(self.blend(counts, prior), always)
            start = 0 if self.tokenizer is None else len(self._initial(always))
            return ids, [max(n, start) for n in range(len(ids) + 1)]
        if self.tokenizer is None:
            return list(self.regular), list(range(self.num_embeddings + 1))
        return self._id_curve(always)

    def blend(self, counts, prior: float = 0.0) -> torch.Tensor:
        """Pseudo-counts ``counts + prior * N * p``: N the tokens counted, p :attr:`prior`. A weight of 1 lets the
        tokenizer's prior weigh as much as the counted text, so a short or narrow calibration text does not
        alone decide which tokens other text loses. Weight 0 returns ``counts`` as they are (today's order)."""
        counts = _check_counts(counts, self.num_embeddings)
        if not prior:
            return counts
        return counts.double() + prior * float(counts.sum()) * self.prior

    @cached_property
    def prior(self) -> torch.Tensor:
        """The tokenizer's own distribution over the regular tokens: float64 ``[num_embeddings]``, zero elsewhere.

        Zipf over merge rank, p(r) proportional to 1 / (r + B): BPE learns its merges most frequent pair first,
        so a token's merge rank is its frequency rank in the tokenizer's training text. The B base symbols every
        cut keeps (byte tokens, byte-fallback pieces, printable ASCII, the decoder's word-boundary symbol) come
        first, in id order, then each merged token at B + the rank of the first merge producing it, then the
        regular tokens no merge produces, in id order (other single characters: SentencePiece lists them last,
        Llama 2's CJK among them). The offset B keeps the base symbols, which no merge ranks among themselves,
        within a factor 2 of each other, and gives the first merges about half the weight of the top symbol.
        Without a tokenizer, the same law over id rank with an offset of 1. (SentencePiece unigram, whose
        scores are log-probabilities, never gets here: the vocabulary cut refuses it.)
        """
        regular = torch.as_tensor(self.regular, dtype=torch.long)
        ranks, offset = (torch.arange(len(regular)), 1) if self.tokenizer is None else self._merge_ranks()
        weights = 1.0 / (ranks.double() + offset)
        prior = torch.zeros(self.num_embeddings, dtype=torch.float64)
        prior[regular] = weights / weights.sum()
        return prior

    def _merge_ranks(self) -> tuple[torch.Tensor, int]:
        """(the Zipf rank of each regular id, in :attr:`regular` order; the number of base symbols B)."""
        tree, forced = self._tree, self._parts[3]
        merge = [tree.rank(tree.tokens.get(i)) for i in self.regular]
        base = [m is None and i in forced for i, m in zip(self.regular, merge)]
        b, after = sum(base), sum(base) + max((m for m in merge if m is not None), default=-1) + 1
        symbols, others = itertools.count(), itertools.count(after)
        ranks = [next(symbols) if is_base else b + m if m is not None else next(others)
                 for is_base, m in zip(base, merge)]
        return torch.as_tensor(ranks), max(b, 1)

    def _id_curve(self, always: list) -> tuple[list[int], list[int]]:
        """:meth:`keep_curve` in id order."""
        vocab = self._parts[0]
        names = {i: t for t, i in vocab.items()}
        ids, kept = [], set()

        def add(token_id: int) -> None:
            for new in [*sorted(_alphabet_ids([names[token_id]], vocab)), token_id]:
                if new in self._allowed and new not in kept:
                    ids.append(new)
                    kept.add(new)

        for token_id in sorted(self._initial(always)):
            add(token_id)
        prefix = [len(ids)]
        for token_id in self.regular:
            add(token_id)
            prefix.append(len(ids))
        return ids, prefix

    def _frequency_order(self, counts: torch.Tensor, always: list) -> list[int]:
        """Regular ids in the order frequency selection takes them, with no budget (see :meth:`keep_curve`)."""
        if self.tokenizer is None:
            return _by_count(counts, self.regular)
        vocab, _, regular, forced = self._parts
        order = sorted(forced & self._allowed)
        kept = set(order)
        for token_id in [*self._always_ids(always), *_by_count(counts, regular)]:
            add = self._tree.closure(token_id, kept, self._allowed)
            if add:
                order += reversed(add)  # ancestors before the token
                kept.update(add)
        return order

    def _initial(self, always: list) -> set[int]:
        """The regular ids kept whatever the cut: base symbols, and the ``always`` tokens with their ancestors."""
        forced = self._parts[3]
        kept = forced & self._allowed
        if always:  # the merge tree is costly to build and only the always tokens need it
            self._add_always(always, kept, forced)
        return kept

    def _check_always(self, always: list) -> None:
        if always and self.tokenizer is None:
            raise ValueError("--vocab-always needs a tokenizer: its token strings name tokens through it")

    def _add_always(self, always: list, kept: set[int], forced: set[int]) -> None:
        """Add the ``--vocab-always`` tokens and the merge ancestors they need to ``kept`` (in place)."""
        for token, token_id in zip(always, self._always_ids(always)):
            if token_id in forced:
                continue
            add = self._tree.closure(token_id, kept, self._allowed)
            if add is None:
                raise ValueError(f"--vocab-always: {token!r} is built from a token without an embedding row")
            kept.update(add)

    def _always_ids(self, always: list) -> list[int]:
        """The ids of the ``--vocab-always`` token strings; ValueError naming the first unknown one."""
        vocab, ids = self._parts[0], []
        for token in always:
            if not isinstance(token, str):
                raise TypeError(f"--vocab-always expects token strings, got {token!r}")
            if token not in vocab:
                pieces = self.tokenizer.convert_ids_to_tokens(self.tokenizer(token, add_special_tokens=False).input_ids)
                raise ValueError(f"--vocab-always: {token!r} is not a token of the tokenizer; write tokens as the "
                                 f"vocabulary spells them (this text encodes as {pieces[:8]})")
            if vocab[token] >= self.num_embeddings:
                raise ValueError(f"--vocab-always: {token!r} is id {vocab[token]}, which has no embedding row "
                                 f"(the model has {self.num_embeddings})")
            ids.append(vocab[token])
        return ids


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

    def rank(self, token: str | None) -> int | None:
        """The rank of the first merge that produces ``token`` (None: no merge does)."""
        pair = self.first.get(token)
        return None if pair is None else self.ranks[pair]

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
