"""Calibration data: token ids from text, JSON lines, .npy arrays or raw .bin token files, packed into rows.

Formats (chosen by file extension):
- ``.txt``: UTF-8 text. The whole file is one document unless it contains form feeds (``\\f``), which separate
  documents. Needs a tokenizer.
- ``.jsonl``: one JSON object per line; its ``text_field`` string is one document. Blank lines are skipped.
  Needs a tokenizer.
- ``.npy``: a 1-D integer array (a token stream, packed like text) or a 2-D ``[N, L]`` array (rows used as-is,
  in order; ``samples`` caps N and ``seq_len`` caps L).
- ``.bin``: a headerless token stream (nanoGPT style), ``bin_dtype`` ``"uint16"`` or ``"uint32"``; memory-mapped,
  so only the prefix that is used gets read.

Text is tokenized without special tokens, documents joined by one EOS id (``eos_id``, else the tokenizer's
``eos_token_id``; no separator when neither exists). Tokenization streams: text is read and tokenized in blocks of
whole lines (``max(64K, 8 * samples * seq_len)`` characters, normally one block) and stops once enough tokens
exist, so a large corpus is never tokenized in full; a token that straddles a block boundary may split differently
than when tokenizing the whole file at once.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .options import BIN_DTYPES, CalibOptions
from .progress import bar as progress_bar

ID_SUFFIXES = (".npy", ".bin")  # formats that hold token ids rather than text
PAD_ID = 0  # padding in a short last row; attention_mask marks it, so any valid id would do


@dataclass
class Calibration:
    """Packed calibration token ids, the padding mask (None when all ones) and where they came from."""

    input_ids: torch.LongTensor  # [N, L]
    attention_mask: torch.LongTensor | None  # [N, L], or None when all ones
    source: str  # human description, e.g. "sotu.txt: 16 x 2048 tokens from 1 document (...)"


def pack_tokens(tokens, samples: int, seq_len: int) -> tuple[torch.LongTensor, torch.LongTensor | None]:
    """Pack the first ``samples * seq_len`` tokens of a 1-D stream, in order, into rows of ``seq_len``.

    With fewer tokens: as many full rows as possible plus one shorter last row padded with ``PAD_ID``
    (attention_mask 0 there); a stream shorter than one row gives one row of its own length.
    The mask is None when every position is a real token.
    """
    if samples < 1 or seq_len < 1:
        raise ValueError(f"samples and seq_len must be >= 1, got samples={samples}, seq_len={seq_len}")
    prefix = tokens[: samples * seq_len]
    flat = (prefix.to(torch.long) if isinstance(prefix, torch.Tensor)
            else torch.from_numpy(np.array(prefix, dtype=np.int64)))
    if flat.ndim != 1:
        raise ValueError(f"pack_tokens needs a 1-D token stream, got shape {tuple(flat.shape)}")
    n = flat.numel()
    if n == 0:
        raise ValueError("pack_tokens got no tokens")
    if n <= seq_len:
        return flat[None].clone(), None
    rows = -(-n // seq_len)
    input_ids = torch.full((rows * seq_len,), PAD_ID, dtype=torch.long)
    input_ids[:n] = flat
    if n == rows * seq_len:
        return input_ids.view(rows, seq_len), None
    mask = torch.zeros(rows * seq_len, dtype=torch.long)
    mask[:n] = 1
    return input_ids.view(rows, seq_len), mask.view(rows, seq_len)


def load_calibration(opts: CalibOptions, *, tokenizer=None, vocab_size: int, eos_id: int | None = None,
                     text_field: str = "text", progress: bool | None = None) -> Calibration:
    """Load up to ``opts.samples`` rows of ``opts.seq_len`` token ids from the calibration file ``opts.path``
    (formats: module docstring).

    Every id must lie in ``[0, vocab_size)``. ``progress`` shows a tqdm bar while tokenizing text
    (None: only on a terminal). Raises FileNotFoundError or ValueError with one line naming the file.
    """
    path, samples, seq_len, bin_dtype = Path(opts.path), opts.samples, opts.seq_len, opts.bin_dtype
    if not path.exists():
        raise FileNotFoundError(f"{path}: calibration file not found")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file ({'a directory' if path.is_dir() else 'a pipe or device'}); "
                         "name a calibration file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: calibration file is empty")
    if vocab_size < 1 or samples < 1 or seq_len < 1:
        raise ValueError(f"{path}: vocab_size, samples and seq_len must be >= 1, "
                         f"got {vocab_size}, {samples}, {seq_len}")
    suffix, bos = path.suffix.lower(), None
    if suffix == ".npy":
        array = _load_npy(path)
        if array.ndim == 2:
            ids = torch.from_numpy(np.array(array[:samples, :seq_len], dtype=np.int64))
            _check_ids(ids, vocab_size, path)
            origin = f"rows 0..{ids.shape[0] - 1} of a {list(array.shape)} array"
            return Calibration(ids, None, f"{path.name}: {_describe(ids, None)}, {origin}")
        tokens, origin = array, f"the first {min(array.size, samples * seq_len):,} of {array.size:,} tokens"
    elif suffix == ".bin":
        tokens = _load_bin(path, bin_dtype)
        origin = f"the first {min(tokens.size, samples * seq_len):,} of {tokens.size:,} {bin_dtype} tokens"
    elif suffix in (".txt", ".jsonl"):
        if tokenizer is None:
            raise ValueError(f"{path}: {suffix} text needs a tokenizer and the model has none: name one with "
                             "--tokenizer PATH (folder, tokenizer.json or tokenizer.model), or give token ids "
                             "(.npy, or a .bin memmap with --calib-dtype)")
        bos = bos_by_default(tokenizer) if seq_len > 1 else None
        seq_len -= bos is not None  # rows start with the BOS the tokenizer adds, as the model saw text in training
        pieces = _txt_pieces(path, _block_chars(samples * seq_len)) if suffix == ".txt" \
            else _jsonl_pieces(path, text_field)
        tokens, origin = _tokenize(pieces, tokenizer, eos_id, samples * seq_len, path, progress)
        if bos is not None:
            origin += f", each row starting with bos {bos}"
    else:
        raise ValueError(f"{path}: unknown calibration format {suffix!r} (expected .txt, .jsonl, .npy or .bin)")
    if len(tokens) == 0:
        raise ValueError(f"{path}: no tokens in calibration file")
    input_ids, attention_mask = pack_tokens(tokens, samples, seq_len)
    if bos is not None:
        input_ids, attention_mask = _with_bos(input_ids, attention_mask, bos)
    _check_ids(input_ids, vocab_size, path)
    return Calibration(input_ids, attention_mask, f"{path.name}: {_describe(input_ids, attention_mask)} from {origin}")


def interleave(parts: list[Calibration]) -> Calibration:
    """The rows of several calibrations in turn (each one's first row, then each one's second, ...), padded to
    the longest row with PAD_ID (masked); one calibration is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    length = max(part.input_ids.shape[1] for part in parts)
    rows, masks = [], []
    for part in parts:
        pad = length - part.input_ids.shape[1]
        mask = torch.ones_like(part.input_ids) if part.attention_mask is None else part.attention_mask
        rows.append(torch.nn.functional.pad(part.input_ids, (0, pad), value=PAD_ID))
        masks.append(torch.nn.functional.pad(mask, (0, pad), value=0))
    order = [(r, i) for r in range(max(len(ids) for ids in rows)) for i in range(len(parts)) if r < len(rows[i])]
    input_ids = torch.stack([rows[i][r] for r, i in order])
    mask = torch.stack([masks[i][r] for r, i in order])
    return Calibration(input_ids, None if bool(mask.all()) else mask, "; ".join(part.source for part in parts))


def bos_by_default(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before text by default (Llama 2/3 do, Qwen and SmolLM2 do not), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def _with_bos(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, bos: int):
    """A BOS column in front of packed rows (and of their mask)."""
    column = torch.full((input_ids.shape[0], 1), bos, dtype=input_ids.dtype)
    if attention_mask is not None:
        attention_mask = torch.cat([torch.ones_like(column), attention_mask], dim=1)
    return torch.cat([column, input_ids], dim=1), attention_mask


def _describe(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    rows, seq_len = input_ids.shape
    if attention_mask is None:
        return f"{rows} x {seq_len} tokens"
    return f"{rows - 1} x {seq_len} + 1 x {int(attention_mask[-1].sum())} tokens (last row padded)"


def _check_ids(input_ids: torch.Tensor, vocab_size: int, path: Path) -> None:
    """Ids outside the model's vocabulary would index out of range later: reject them here."""
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}), found min {lo} and max {hi}")


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (1, 2):
        raise ValueError(f"{path}: expected a 1-D or 2-D integer array, got {array.ndim}-D {array.dtype}")
    if array.size == 0:
        raise ValueError(f"{path}: array {list(array.shape)} holds no tokens")
    if array.dtype == np.uint64 and int(array.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{path}: token ids must lie in [0, 2^63); found max {int(array.max())}")
    return array


def _load_bin(path: Path, bin_dtype: str | None) -> np.memmap:
    if bin_dtype not in BIN_DTYPES:
        got = "" if bin_dtype is None else f", got {bin_dtype!r}"
        raise ValueError(f"{path}: a .bin token file needs --calib-dtype {' or '.join(BIN_DTYPES)} "
                         f"(the width of its ids){got}")
    itemsize = np.dtype(bin_dtype).itemsize
    if os.path.getsize(path) % itemsize:
        raise ValueError(f"{path}: size {os.path.getsize(path)} is not a multiple of {itemsize} "
                         f"(--calib-dtype {bin_dtype})")
    return np.memmap(path, dtype=bin_dtype, mode="r")


def _block_chars(need: int) -> int:
    """Characters per tokenizer call: about 2x the needed tokens at ~4 characters per token."""
    return max(1 << 16, 8 * need)


def _txt_pieces(path: Path, block_chars: int) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces in file order: form feeds end documents, other cuts fall after a newline."""
    carry = ""
    with open(path, encoding="utf-8-sig") as f:
        try:
            while block := f.read(block_chars):
                *documents, carry = (carry + block).split("\f")
                for document in documents:
                    yield document, True
                cut = carry.rfind("\n") + 1 or len(carry)
                if cut:
                    yield carry[:cut], False
                carry = carry[cut:]
        except UnicodeDecodeError:
            offset, reason = _first_bad_byte(path)
            raise ValueError(f"{path}: not UTF-8 text ({reason} at byte {offset:,})") from None
    yield carry, True


def _first_bad_byte(path: Path) -> tuple[int, str]:
    """(offset in the file, reason) of the first byte that is not UTF-8."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return max(offset + e.start - len(decoder.getstate()[0]), 0), e.reason
            offset += len(chunk)
    return offset, "truncated character at the end"


def _jsonl_pieces(path: Path, field: str) -> Iterator[tuple[str, bool]]:
    """Each non-blank line's ``field`` string, as one whole document (a leading BOM is skipped)."""
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: no string field {field!r}")
            yield text, True


def _batches(pieces: Iterable[tuple[str, bool]], chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Group pieces so each tokenizer call gets at least ``chars`` characters (fewer at the end).

    Called with half a .txt block: a block cut back to its last newline is then still one call.
    """
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids without special tokens, from a `tokenizers.Tokenizer` or a transformers tokenizer."""
    if hasattr(tokenizer, "encode_batch"):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _tokenize(pieces, tokenizer, eos_id: int | None, need: int, path: Path,
              progress: bool | None) -> tuple[np.ndarray, str]:
    """Tokenize pieces in order, EOS between documents, until ``need`` tokens; returns them and a description."""
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    starts: list[int] = []  # where each document's tokens begin: those past `need` are not used
    chars = 0
    in_document = separate = False
    with progress_bar(total=need, unit="tok", desc=f"tokenizing {path.name}", progress=progress) as bar:
        for batch in _batches(pieces, _block_chars(need) // 2):
            before = len(ids)
            for (text, ends_document), piece_ids in zip(batch, _encode(tokenizer, [t for t, _ in batch])):
                chars += len(text)
                if piece_ids and not in_document:
                    if separate and eos is not None:
                        ids.append(eos)
                    starts.append(len(ids))
                    in_document = True
                ids.extend(piece_ids)
                if ends_document and in_document:
                    in_document, separate = False, True
            bar.update(min(len(ids), need) - min(before, need))
            if len(ids) >= need:
                break
    joined = f"joined by eos {eos}" if eos is not None else "joined without separator"
    documents = sum(start < need for start in starts)
    origin = (f"{documents} document(s) in the first {chars:,} characters, "
              f"tokenized by {type(tokenizer).__name__}, {joined}")
    return np.asarray(ids[:need], dtype=np.int64), origin


def stream(path, *, bin_dtype: str | None = None, text_field: str = "text",
           chunk_tokens: int = 1 << 22) -> Iterator[str | np.ndarray]:
    """The whole calibration file in order, a chunk at a time (never all in memory): text pieces for
    .txt/.jsonl, int arrays of at most ``chunk_tokens`` ids for .npy/.bin. Used to count token frequencies."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in ID_SUFFIXES:
        ids = _load_npy(path).reshape(-1) if suffix == ".npy" else _load_bin(path, bin_dtype)
        for start in range(0, ids.size, chunk_tokens):
            yield np.array(ids[start:start + chunk_tokens], dtype=np.int64)  # a writable copy of one chunk
    elif suffix == ".txt":
        yield from (text for text, _ in _txt_pieces(path, 1 << 20))
    elif suffix == ".jsonl":
        yield from (text for text, _ in _jsonl_pieces(path, text_field))
    else:
        raise ValueError(f"{path}: unknown calibration format {suffix!r} (expected .txt, .jsonl, .npy or .bin)")
