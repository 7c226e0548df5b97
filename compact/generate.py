"""Calibration text the model writes itself: no corpus needed, and close to the mix the model was trained on
(self-generated calibration data, arXiv 2406.15524 and 2410.17711). Each sample is drawn from the model's own
distribution (temperature 1 by default, no top-k or top-p) from its BOS token (EOS when it has none), and the
samples are written as documents separated by form feeds, which `compact.data` reads as documents."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .loading import Loaded
from .options import positive
from .progress import bar


@dataclass(frozen=True)
class Sampling:
    """How many samples of how many new tokens, drawn how: `seed` makes the text reproducible on one machine
    (sampling on another device or library version may draw other tokens); `batch_size` samples per call."""

    samples: int = 16
    length: int = 512
    seed: int = 0
    temperature: float = 1.0
    batch_size: int = 8


def generate(loaded: Loaded, sampling: Sampling = Sampling(), *, progress: bool | None = None) -> list[str]:
    """`sampling.samples` texts the model writes from its BOS token, each up to `sampling.length` tokens (a
    sample that reaches EOS ends there), decoded without special tokens."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise ValueError("writing calibration text needs the model's tokenizer: name one with --tokenizer")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start the samples from")
    problem = positive(sampling.temperature)
    if problem:
        raise ValueError(f"--temperature {problem}")
    device = model.get_input_embeddings().weight.device
    texts = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.inference_mode(), \
            bar(total=sampling.samples, unit="sample", desc="writing calibration text", progress=progress) as shown:
        torch.manual_seed(sampling.seed)
        for first in range(0, sampling.samples, sampling.batch_size):
            rows = min(sampling.batch_size, sampling.samples - first)
            ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                                 temperature=sampling.temperature, max_new_tokens=sampling.length,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start)
            texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
            shown.update(rows)
    return [text.replace("\f", "\n") for text in texts]


def check_out(out: Path) -> None:
    """Refuse an --out that exists (it is never replaced) or whose folder does not: before the model loads, and
    again when writing."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ValueError(f"--out {out} exists: remove it or choose another name")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")


def write(texts: list[str], out: Path) -> None:
    """The texts as one file of form-feed separated documents, written whole or not at all; an existing file is
    never replaced."""
    out = Path(out)
    check_out(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with tmp.open("x", encoding="utf-8") as f:  # (the umask's mode, as any file the user writes)
            f.write("\f".join(texts))
        os.link(tmp, out)  # fails, rather than replaces, when `out` appeared meanwhile
    finally:
        tmp.unlink(missing_ok=True)
