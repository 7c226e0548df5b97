"""The calibration data of a prune: its rows for the engine (capped at the model's context, renumbered for a
vocabulary-pruned model) and its token counts for the vocabulary policy and the planner."""
from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .. import data, runs, vocab
from ..loading import Loaded
from ..options import CalibOptions
from ..report import original_ids

def calibrate(loaded: Loaded, opts: CalibOptions, progress: bool | None = None) -> data.Calibration:
    """Calibration sequences for the model, seq_len capped at its context; of several files, `samples` rows
    shared out evenly (the first files one more) and interleaved, so that any prefix of the rows mixes them."""
    if opts.path is None:
        raise ValueError("this needs calibration data: pass --calib PATH")
    files = opts.files()
    if len(files) > opts.samples:
        raise ValueError(f"--samples {opts.samples} is fewer than the {len(files)} calibration sources (files, and "
                         "--calib-generate's text): at least one row each")
    shares = [opts.samples // len(files) + (i < opts.samples % len(files)) for i in range(len(files))]
    return data.interleave([_calibrate_file(loaded, replace(_one(opts, path), samples=rows), progress)
                            for path, rows in zip(files, shares)])


@contextmanager
def with_generated(loaded: Loaded, opts: CalibOptions, *, seed: int, group: runs.Group,
                   progress: bool | None = None) -> Iterator[CalibOptions]:
    """`opts` with `opts.generate` texts the model writes itself (compact.generate, seeded; each up to a row's
    length, at most Sampling's 512 tokens) as one more source, a file that lasts as long as the context; under
    torchrun rank 0 writes them and every rank reads rank 0's."""
    from .. import generate

    if loaded.offloaded:
        raise ValueError("--calib-generate samples from the whole model: drop --offload layerwise (or write the "
                         "text first with compact generate, and pass it to --calib)")
    if loaded.tokenizer is None:  # (on every rank: rank 0 alone raising would leave the others waiting)
        raise ValueError("--calib-generate writes text: the model needs a tokenizer (name one with --tokenizer)")
    sampling = generate.Sampling(samples=opts.generate, length=min(opts.seq_len, generate.Sampling.length), seed=seed)
    texts = group.broadcast(generate.generate(loaded, sampling, progress=progress) if group.rank == 0 else None)
    with tempfile.TemporaryDirectory(prefix="compact-generated-") as folder:
        path = Path(folder) / "generated.txt"
        generate.write(texts, path)
        yield replace(opts, path=(*opts.paths, str(path)), generate=0)


def _one(opts: CalibOptions, path: Path) -> CalibOptions:
    """`opts` for the one file `path` (--calib-dtype only for a .bin)."""
    return replace(opts, path=str(path), bin_dtype=opts.bin_dtype if path.suffix == ".bin" else None)


def _calibrate_file(loaded: Loaded, opts: CalibOptions, progress: bool | None) -> data.Calibration:
    """`calibrate` of one file."""
    model = loaded.model
    context = getattr(model.config, "max_position_embeddings", None) or opts.seq_len
    eos = getattr(loaded.tokenizer, "eos_token_id", None) if loaded.tokenizer else model.config.eos_token_id
    # Token-id data for a pruned model holds the original model's ids (before every prune): map them through
    # the composition of the cuts.
    report = loaded.report if Path(opts.path).suffix in data.ID_SUFFIXES else None
    if loaded.report_damaged and Path(opts.path).suffix in data.ID_SUFFIXES:
        raise ValueError(loaded.report_damaged)
    remap, original_vocab = original_ids(report) if report else (None, None)
    calib = data.load_calibration(
        replace(opts, seq_len=min(opts.seq_len, context)), tokenizer=loaded.tokenizer,
        vocab_size=original_vocab if report else model.get_input_embeddings().num_embeddings,
        eos_id=eos if isinstance(eos, int) and not remap else None, progress=progress)
    if remap:
        calib.input_ids = renumber(calib.input_ids, calib.attention_mask, remap, original_vocab, opts.path)
    return calib


def renumber(input_ids: torch.Tensor, attention_mask, kept_token_ids: list[int], old_vocab: int, path) -> torch.Tensor:
    """Old token ids -> new ids of a vocabulary-pruned model; an error names a dropped id the data holds."""
    table = torch.full((old_vocab,), -1, dtype=torch.long)
    table[torch.tensor(kept_token_ids)] = torch.arange(len(kept_token_ids))
    new = table[input_ids]
    valid = torch.ones_like(new, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    dropped = (new < 0) & valid
    if dropped.any():
        raise ValueError(f"{path} holds token id {int(input_ids[dropped][0])}, which this pruned model's "
                         f"vocabulary dropped ({int(dropped.sum())} such positions)")
    return new.clamp_min(0)


def token_counts(loaded: Loaded, calib_opts: CalibOptions, progress: bool | None = None, part=None) -> torch.Tensor:
    """Token frequencies over the whole calibration file, streamed (of several files, each file's scaled to the
    same total: float64); `part` 0 or 1: over every other line of text (block of 4096 ids), the two halves the
    planner cross-fits frequency order on."""
    if calib_opts.path is None:
        raise ValueError("--vocab-order frequency and --target-params need calibration data: pass --calib PATH")
    files = calib_opts.files()
    if len(files) > 1:  # each file's counts scaled to the mean total: every source weighs the same
        counts = [token_counts(loaded, _one(calib_opts, path), progress, part) for path in files]
        totals = [float(c.sum()) for c in counts]
        mean = sum(totals) / len(totals)
        return sum(c.double() * (mean / total) for c, total in zip(counts, totals) if total > 0)
    rows = loaded.model.get_input_embeddings().num_embeddings
    chunks = data.stream(files[0], bin_dtype=calib_opts.bin_dtype)
    if part is not None:
        chunks = itertools.islice(_pieces(chunks), part, None, 2)
    return vocab.count_tokens(loaded.tokenizer, chunks, num_embeddings=rows, progress=progress)


def _pieces(chunks):
    """Lines of text chunks, 4096-id blocks of id chunks."""
    for chunk in chunks:
        if isinstance(chunk, str):
            yield from chunk.splitlines(keepends=True)
        else:
            yield from (chunk[i:i + 4096] for i in range(0, len(chunk), 4096))
