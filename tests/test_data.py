"""Calibration data: packing, every file format, streaming tokenization and the error messages."""

import json
import os
import shutil
import time
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch

from compact.data import Calibration, load_calibration, pack_tokens
from compact.options import CalibOptions

SHARED_DATA = Path(os.environ.get("COMPACT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A calibration corpus should look like the text the pruned model will see.",
    "Rare tokens are dropped from the vocabulary; common ones stay.",
    "Pack tokens into rows of a fixed length, in order, with padding at the end.",
] * 20


class Recording:
    """A bare `tokenizers.Tokenizer` stand-in that records how many characters it was asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chars = tokenizer, 0

    def encode_batch(self, texts, add_special_tokens):
        self.chars += sum(map(len, texts))
        return self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here in milliseconds, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- pack_tokens -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [list, np.array, torch.tensor])
def test_pack_exact_and_truncated(kind):
    ids, mask = pack_tokens(kind(list(range(30))), samples=3, seq_len=8)
    assert mask is None and ids.dtype == torch.long
    assert ids.tolist() == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_pack_short_last_row_is_padded():
    ids, mask = pack_tokens(np.arange(1, 20), samples=4, seq_len=8)
    assert ids.shape == (3, 8) and mask.shape == (3, 8)
    assert ids[2].tolist() == [17, 18, 19, 0, 0, 0, 0, 0]
    assert mask.sum().item() == 19 and mask[2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[mask.bool()].tolist() == list(range(1, 20))


def test_pack_shorter_than_one_row():
    ids, mask = pack_tokens([5, 6, 7], samples=4, seq_len=8)
    assert ids.tolist() == [[5, 6, 7]] and mask is None


def test_pack_errors():
    with pytest.raises(ValueError, match="no tokens"):
        pack_tokens([], 2, 4)
    with pytest.raises(ValueError, match="1-D"):
        pack_tokens(np.zeros((2, 3), dtype=np.int64), 2, 4)
    with pytest.raises(ValueError, match="must be >= 1"):
        pack_tokens([1, 2], 0, 4)


# ---- token files -------------------------------------------------------------------------------------------

def test_npy_1d_round_trip(tmp_path):
    path = tmp_path / "stream.npy"
    np.save(path, np.arange(100, dtype=np.int32) % 50)
    cal = load_calibration(CalibOptions(str(path), samples=3, seq_len=16), vocab_size=50)
    assert isinstance(cal, Calibration) and cal.attention_mask is None
    assert cal.input_ids.dtype == torch.long
    assert cal.input_ids.flatten().tolist() == [i % 50 for i in range(48)]
    assert cal.source == "stream.npy: 3 x 16 tokens from the first 48 of 100 tokens"


def test_npy_2d_used_as_is(tmp_path):
    path = tmp_path / "rows.npy"
    rows = np.arange(60, dtype=np.int64).reshape(6, 10)
    np.save(path, rows)
    cal = load_calibration(CalibOptions(str(path), samples=4, seq_len=7), vocab_size=60)
    assert cal.input_ids.tolist() == rows[:4, :7].tolist() and cal.attention_mask is None
    assert "rows 0..3 of a [6, 10] array" in cal.source
    whole = load_calibration(CalibOptions(str(path), samples=100, seq_len=100), vocab_size=60)
    assert whole.input_ids.shape == (6, 10)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_round_trip(tmp_path, dtype):
    path = tmp_path / "train.bin"
    tokens = (np.arange(1000) * 7919 % 70000 if dtype == "uint32" else np.arange(1000) % 5000).astype(dtype)
    tokens.tofile(path)
    cal = load_calibration(CalibOptions(str(path), samples=4, seq_len=64, bin_dtype=dtype), vocab_size=70000)
    assert cal.input_ids.flatten().tolist() == tokens[:256].tolist()
    assert cal.source == f"train.bin: 4 x 64 tokens from the first 256 of 1,000 {dtype} tokens"


def test_bin_short_file_pads(tmp_path):
    path = tmp_path / "short.bin"
    np.arange(1, 101, dtype=np.uint16).tofile(path)
    cal = load_calibration(CalibOptions(str(path), samples=4, seq_len=64, bin_dtype="uint16"), vocab_size=200)
    assert cal.input_ids.shape == (2, 64) and cal.attention_mask[1].sum().item() == 36
    assert "1 x 64 + 1 x 36 tokens (last row padded)" in cal.source


@pytest.mark.serial
def test_bin_large_reads_only_the_prefix(tmp_path):
    """20M uint16 tokens (40 MB, mostly a sparse hole); an out-of-vocabulary id past the prefix is never seen."""
    path = tmp_path / "big.bin"
    n = 20_000_000
    data = np.memmap(path, dtype=np.uint16, mode="w+", shape=(n,))
    data[: 1 << 16] = np.arange(1 << 16) % 1000
    data[n - 1] = 65535
    data.flush()
    del data
    start = time.perf_counter()
    cal = load_calibration(CalibOptions(str(path), samples=16, seq_len=2048, bin_dtype="uint16"), vocab_size=1000)
    assert time.perf_counter() - start < 2.0
    assert cal.input_ids.shape == (16, 2048)
    assert cal.input_ids.flatten().tolist() == (np.arange(16 * 2048) % 1000).tolist()
    assert "of 20,000,000 uint16 tokens" in cal.source


# ---- text ----------------------------------------------------------------------------------------------------

def test_txt_one_document(tmp_path, tokenizer):
    text = "\n".join(SENTENCES[:8]) + "\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    cal = load_calibration(CalibOptions(str(path), samples=100, seq_len=32), tokenizer=tokenizer,
                           vocab_size=len(tokenizer), progress=False)
    expected = encode(tokenizer, text)
    assert cal.input_ids[cal.attention_mask.bool()].tolist() == expected
    assert "1 document(s)" in cal.source and type(tokenizer).__name__ in cal.source


def test_txt_form_feeds_separate_documents(tmp_path, tokenizer):
    docs = ["First document.\n", "Second one.\n", "", "Third."]
    path = tmp_path / "docs.txt"
    path.write_text("\f".join(docs))
    eos = tokenizer.eos_token_id
    opts = CalibOptions(str(path), samples=1, seq_len=1000)
    cal = load_calibration(opts, tokenizer=tokenizer, vocab_size=len(tokenizer))
    expected = encode(tokenizer, docs[0]) + [eos] + encode(tokenizer, docs[1]) + [eos] + encode(tokenizer, docs[3])
    assert cal.input_ids[0].tolist() == expected
    assert "3 document(s)" in cal.source and f"joined by eos {eos}" in cal.source
    cal = load_calibration(opts, tokenizer=tokenizer, vocab_size=len(tokenizer), eos_id=0)
    assert cal.input_ids[0].tolist() == [0 if t == eos else t for t in expected]


def test_txt_without_eos_concatenates(tmp_path, tokenizer):
    path = tmp_path / "docs.txt"
    path.write_text("one\ftwo")
    cal = load_calibration(CalibOptions(str(path), samples=1, seq_len=100),
                           tokenizer=Recording(tokenizer.backend_tokenizer), vocab_size=len(tokenizer))
    assert cal.input_ids[0].tolist() == encode(tokenizer, "one") + encode(tokenizer, "two")
    assert "joined without separator" in cal.source


def test_txt_streams_only_a_prefix(tmp_path, tokenizer):
    """A 1.2 MB file, 2 x 64 tokens needed: one 64K-character block is tokenized, matching whole-file tokens."""
    text = "\n".join(SENTENCES * 240) + "\n"
    path = tmp_path / "large.txt"
    path.write_text(text)
    recording = Recording(tokenizer.backend_tokenizer)
    cal = load_calibration(CalibOptions(str(path), samples=2, seq_len=64), tokenizer=recording,
                           vocab_size=len(tokenizer))
    assert recording.chars <= 1 << 16 and len(text) > 18 * (1 << 16)
    assert cal.input_ids.flatten().tolist() == encode(tokenizer, text[:5000])[:128]


def test_progress_bar(tmp_path, tokenizer, capsys):
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(SENTENCES))
    load_calibration(CalibOptions(str(path), samples=2, seq_len=16), tokenizer=tokenizer, vocab_size=len(tokenizer),
                     progress=True)
    assert "tokenizing corpus.txt" in capsys.readouterr().err


def test_jsonl_documents_across_batches(tmp_path):
    """3000 documents of one token each (~220K characters) take several tokenizer calls; EOS joins them."""
    docs = [f"{SENTENCES[i % 4]} Number {i}." for i in range(3000)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)) + "\n\n")
    expected = [t for d in docs for t in (len(d) % 50 + 2, 1)][:-1]
    tok = DocLength()
    cal = load_calibration(CalibOptions(str(path), samples=2, seq_len=4000), tokenizer=tok, vocab_size=52, eos_id=1,
                           text_field="body")
    assert tok.calls > 3
    assert cal.input_ids[cal.attention_mask.bool()].tolist() == expected
    assert "3000 document(s)" in cal.source


def test_deterministic(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    opts = CalibOptions(str(path), samples=3, seq_len=50)
    a, b = (load_calibration(opts, tokenizer=tokenizer, vocab_size=len(tokenizer)) for _ in range(2))
    assert torch.equal(a.input_ids, b.input_ids) and a.source == b.source
    assert a.attention_mask is None and a.input_ids.shape == (3, 50)


def test_real_llama2_tokenizer_on_sotu(tmp_path):
    """Llama 2's SentencePiece tokenizer on real prose: the packed rows equal whole-text tokenization."""
    model, corpus = SHARED_DATA / "llama2-tokenizer.model", SHARED_DATA / "sotu.txt"
    if not (model.is_file() and corpus.is_file()):
        pytest.skip(f"real tokenizer or corpus not available in {SHARED_DATA} (set COMPACT_SHARED_DATA)")
    pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    shutil.copy(model, tmp_path / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(tmp_path)
    cal = load_calibration(CalibOptions(str(corpus), samples=4, seq_len=512), tokenizer=tok, vocab_size=32000)
    assert cal.input_ids.shape == (4, 512) and cal.attention_mask is None
    head = corpus.read_text(encoding="utf-8")[:20_000]
    assert cal.input_ids.flatten().tolist() == encode(tok, head)[:2048]


def test_rows_start_with_the_bos_the_tokenizer_adds(tmp_path):
    """A tokenizer that puts BOS before text (Llama 2 here) gets BOS at the start of every row, as the model saw
    text in training; the rest of the rows is the text's tokens in order. One that adds none gets none."""
    from tokenizers_fixtures import llama2_tokenizer

    tok = llama2_tokenizer(tmp_path)  # skips without ../shared/data
    corpus = tmp_path / "calib.txt"
    corpus.write_text((SHARED_DATA / "sotu.txt").read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    cal = load_calibration(CalibOptions(str(corpus), samples=3, seq_len=64), tokenizer=tok, vocab_size=32000)
    assert cal.input_ids.shape == (3, 64) and cal.input_ids[:, 0].tolist() == [tok.bos_token_id] * 3
    assert cal.input_ids[:, 1:].flatten().tolist() == encode(tok, corpus.read_text(encoding="utf-8"))[:3 * 63]
    assert "each row starting with bos 1" in cal.source
    tok.add_bos_token = False
    plain = load_calibration(CalibOptions(str(corpus), samples=3, seq_len=64), tokenizer=tok, vocab_size=32000)
    assert plain.input_ids.flatten().tolist() == encode(tok, corpus.read_text(encoding="utf-8"))[:3 * 64]


# ---- errors --------------------------------------------------------------------------------------------------

def test_missing_empty_and_unknown(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npy"):
        load_calibration(CalibOptions(str(tmp_path / "absent.npy")), vocab_size=10)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin: calibration file is empty"):
        load_calibration(CalibOptions(str(tmp_path / "empty.bin"), bin_dtype="uint16"), vocab_size=10)
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(ValueError, match=r"data.csv: unknown calibration format '.csv'"):
        load_calibration(CalibOptions(str(tmp_path / "data.csv")), vocab_size=10)


def test_ids_out_of_range(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([1, 2, 70, 3], dtype=np.int64))
    with pytest.raises(ValueError, match=r"ids.npy: token ids must lie in \[0, 50\), found min 1 and max 70"):
        load_calibration(CalibOptions(str(path)), vocab_size=50)
    np.save(path, np.array([[1, -4], [2, 3]], dtype=np.int16))
    with pytest.raises(ValueError, match="found min -4 and max 3"):
        load_calibration(CalibOptions(str(path)), vocab_size=50)


def test_text_ids_beyond_model_vocab(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox.")
    with pytest.raises(ValueError, match=r"t.txt: token ids must lie in \[0, 3\)"):
        load_calibration(CalibOptions(str(path)), tokenizer=tokenizer, vocab_size=3)


def test_bad_npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 2, 2), dtype=np.int32))
    with pytest.raises(ValueError, match="x.npy: expected a 1-D or 2-D integer array, got 3-D int32"):
        load_calibration(CalibOptions(str(path)), vocab_size=10)
    np.save(path, np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match="got 1-D float32"):
        load_calibration(CalibOptions(str(path)), vocab_size=10)
    np.save(path, np.zeros(0, dtype=np.int32))
    with pytest.raises(ValueError, match="holds no tokens"):
        load_calibration(CalibOptions(str(path)), vocab_size=10)
    path.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="x.npy: not a readable .npy array"):
        load_calibration(CalibOptions(str(path)), vocab_size=10)


def test_bad_bin(tmp_path):
    path = tmp_path / "x.bin"
    np.arange(5, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"x.bin: a .bin token file needs --calib-dtype uint16 or uint32"):
        load_calibration(CalibOptions(str(path)), vocab_size=10)
    with pytest.raises(ValueError, match="got 'int8'"):
        load_calibration(CalibOptions(str(path), bin_dtype="int8"), vocab_size=10)
    with pytest.raises(ValueError, match="x.bin: size 10 is not a multiple of 4"):
        load_calibration(CalibOptions(str(path), bin_dtype="uint32"), vocab_size=10)


def test_text_errors(tmp_path, tokenizer):
    txt = tmp_path / "a.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match=r"a.txt: .txt text needs a tokenizer .* --tokenizer PATH .*\.npy"):
        load_calibration(CalibOptions(str(txt)), vocab_size=10)
    txt.write_bytes(b"caf\xe9 \xff\xfe")
    with pytest.raises(ValueError, match="a.txt: not UTF-8 text"):
        load_calibration(CalibOptions(str(txt)), tokenizer=tokenizer, vocab_size=len(tokenizer))
    txt.write_text("\n\n")
    with pytest.raises(ValueError, match="a.txt: no tokens"):
        load_calibration(CalibOptions(str(txt)), tokenizer=DocLength(), vocab_size=10)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="b.jsonl:2: no string field 'text'"):
        load_calibration(CalibOptions(str(jsonl)), tokenizer=tokenizer, vocab_size=len(tokenizer))
    jsonl.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(ValueError, match="b.jsonl:2: invalid JSON"):
        load_calibration(CalibOptions(str(jsonl)), tokenizer=tokenizer, vocab_size=len(tokenizer))


class DocLength:
    """A toy `tokenizers.Tokenizer` stand-in: one token per text (its length mod 50, plus 2), or none for blanks."""

    def __init__(self):
        self.calls = 0

    def encode_batch(self, texts, add_special_tokens):
        self.calls += 1
        return [SimpleNamespace(ids=[len(t) % 50 + 2] if t.strip() else []) for t in texts]
