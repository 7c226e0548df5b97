"""Vocabulary selection and tokenizer surgery (compact.vocab) on real tokenizers and real text."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.tokenization_python import PythonBackend

from compact.tokenizer import prune_tokenizer, special_token_ids
from compact.vocab import Vocabulary
from tokenizers_fixtures import llama2_tokenizer, llama32_tokenizer, qwen25_tokenizer, sotu_paragraphs

# name -> (loader taking a scratch folder, embedding rows of the real model, regular tokens)
REAL = {
    # the package ships the Llama 3.2 Vision tokenizer: 128257 tokens, the last (<|image|>) beyond the 128256
    # embedding rows of Llama 3.2 1B/3B, so it must be dropped
    "llama3.2": (lambda folder: llama32_tokenizer(), 128256, 128000),
    "qwen2.5": (lambda folder: qwen25_tokenizer(), 151936, 151643),  # 271 padding rows beyond the tokenizer
    "llama2": (llama2_tokenizer, 32000, 31997),
}
KEEPS = [300, 1000, 5000, "full"]
ODD_TEXTS = [
    "héllo wörld — naïve café, ½ × ∞ ≠ 0",
    "emoji 👍🏽 and a family 👨‍👩‍👧 🦜",
    "日本語のテキスト、中文字符 你好 한국어",
    "  leading spaces, tabs\tand\t\ttabs\nnew\n\n\nlines   \r\n trailing  ",
    "zero\u200bwidth, combining e\u0301, arabic مرحبا, math 𝔘𝔫𝔦",
    "code: def f(x):\n    return x ** 2  # ok\n",
]
DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
CHAT = [{"role": "user", "content": "What is the State of the Union?"}, {"role": "assistant", "content": "A speech."}]


@pytest.fixture(scope="module")
def texts():
    return sotu_paragraphs(200) + ODD_TEXTS


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """name -> the real tokenizer, built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = REAL[name][0](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def prune(load):
    """(name, N) -> one real tokenizer pruned to N regular tokens ("full": all), built once per module."""
    cache = {}

    def get(name, keep):
        if (name, keep) not in cache:
            tokenizer, (_, num_embeddings, regular) = load(name), REAL[name]
            n = regular if keep == "full" else keep
            kept = Vocabulary(tokenizer, num_embeddings).kept(n)
            cache[name, keep] = SimpleNamespace(tokenizer=tokenizer, num_embeddings=num_embeddings, keep=n,
                                                kept=kept, pruned=prune_tokenizer(tokenizer, kept))
        return cache[name, keep]

    return get


def _round_trip(tokenizer, text: str) -> str:
    return tokenizer.decode(tokenizer(text).input_ids, **DECODE)


EACH = pytest.mark.parametrize("name,keep", [(n, k) for n in REAL for k in KEEPS])


@EACH
def test_selection(prune, name, keep):
    case = prune(name, keep)
    tokenizer, kept = case.tokenizer, case.kept
    assert kept == sorted(set(kept)), "not ascending and unique"
    rows = min(len(tokenizer), case.num_embeddings)
    specials = {i for i in special_token_ids(tokenizer) if i < rows}
    assert specials <= set(kept), "a special/added token was dropped"
    assert kept[-1] < rows, "kept a padding row or an id beyond the embedding"
    regular = [i for i in range(rows) if i not in specials]
    assert set(regular[:case.keep]) <= set(kept)
    assert len(kept) >= case.keep + len(specials)


@EACH
def test_token_strings_follow_kept_ids(prune, name, keep):
    case = prune(name, keep)
    assert len(case.pruned) == len(case.kept)
    assert case.pruned.convert_ids_to_tokens(list(range(len(case.kept)))) == case.tokenizer.convert_ids_to_tokens(
        case.kept
    )


@EACH
def test_encodes_in_range_and_round_trips(prune, name, keep, texts):
    """Lossless as the original: Llama 2's own round trip drops one leading space, the others are exact."""
    case = prune(name, keep)
    for text, ids in zip(texts, case.pruned(texts).input_ids):
        assert max(ids) < len(case.kept), f"emitted id {max(ids)} >= {len(case.kept)} for {text[:40]!r}"
        expected = _round_trip(case.tokenizer, text)
        assert case.pruned.decode(ids, **DECODE) == expected, f"round trip changed {text[:40]!r}"
        assert expected == text or text.startswith(" ")


@EACH
def test_specials_keep_their_role_under_new_ids(prune, name, keep):
    case = prune(name, keep)
    tokenizer, kept, pruned = case.tokenizer, case.kept, case.pruned
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(pruned, attr) == getattr(tokenizer, attr)
        if getattr(tokenizer, attr) is not None:
            assert getattr(pruned, attr + "_id") == kept.index(getattr(tokenizer, attr + "_id"))
    added = {kept.index(i): t.content for i, t in tokenizer.added_tokens_decoder.items() if i in kept}
    assert {i: t.content for i, t in pruned.added_tokens_decoder.items()} == added
    if tokenizer.bos_token_id is not None and tokenizer("x").input_ids[0] == tokenizer.bos_token_id:
        assert pruned("x").input_ids[0] == pruned.bos_token_id  # the post-processor's bos is renumbered


@pytest.mark.parametrize("name,keep", [(n, k) for n in ("llama3.2", "qwen2.5") for k in KEEPS])
def test_chat_template_carries_over(prune, name, keep):
    case = prune(name, keep)
    text = case.tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert case.pruned.apply_chat_template(CHAT, tokenize=False) == text
    ids = case.pruned.apply_chat_template(CHAT)["input_ids"]  # transformers 5 returns a BatchEncoding
    assert max(ids) < len(case.kept)
    assert case.pruned.decode(ids, clean_up_tokenization_spaces=False) == text


@pytest.mark.parametrize("name", list(REAL))
def test_full_vocabulary_is_the_identity(prune, name, texts):
    case = prune(name, "full")
    assert case.kept == list(range(min(len(case.tokenizer), case.num_embeddings)))
    assert case.pruned(texts).input_ids == case.tokenizer(texts).input_ids


@pytest.mark.parametrize("name", list(REAL))
def test_pruned_tokenizer_still_merges(prune, name, texts):
    """At N = 1000 text must not fall apart into bytes (SentencePiece needs its characters kept for that).

    Measured on sotu: ~0.44 tokens per byte at N = 1000 (~0.24 unpruned), 1.0 when Llama 2's characters are dropped.
    """
    case = prune(name, 1000)
    tokens = sum(map(len, case.pruned(texts).input_ids))
    assert tokens < 0.6 * sum(len(t.encode()) for t in texts)


@pytest.mark.parametrize("name", list(REAL))
def test_save_and_reload(prune, name, texts, tmp_path):
    pruned = prune(name, 1000).pruned
    pruned.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(pruned)
    assert reloaded(texts).input_ids == pruned(texts).input_ids
    assert reloaded.special_tokens_map == pruned.special_tokens_map
    assert reloaded.chat_template == pruned.chat_template


@pytest.mark.parametrize("name", list(REAL))
def test_one_regular_token_is_still_lossless(load, name, texts):
    """Byte tokens (byte-level) or byte-fallback pieces and ▁ are always kept, so any text survives."""
    tokenizer, (_, num_embeddings, _) = load(name), REAL[name]
    kept = Vocabulary(tokenizer, num_embeddings).kept(1)
    pruned = prune_tokenizer(tokenizer, kept)
    for text in texts[:20] + ODD_TEXTS:
        ids = pruned(text).input_ids
        assert max(ids) < len(kept) and pruned.decode(ids, **DECODE) == _round_trip(tokenizer, text)


@pytest.mark.parametrize("keep", [0, -3, 31998])
def test_keep_out_of_range_names_the_option(load, keep):
    with pytest.raises(ValueError, match="--vocab-keep.*31997"):
        Vocabulary(load("llama2"), 32000).kept(keep)


def test_extra_ids_and_no_tokenizer():
    with pytest.warns(UserWarning, match="no tokenizer: id order assumes"):
        assert Vocabulary(None, 10, extra_ids=[8, None, [9, 2], 12]).kept(4) == [0, 1, 2, 3, 8, 9]
        assert Vocabulary(None, 10).kept(10) == list(range(10))
    with pytest.raises(ValueError, match="--vocab-keep"):
        Vocabulary(None, 10).kept(11)


def test_always_tokens_in_id_order(load):
    """--vocab-always works in id order too: the tokens and the merge ancestors they need are added on top of
    the lowest ids (so the cut tokenizer can still build them); an unknown token string is an error."""
    tokenizer = load("llama3.2")
    vocab = tokenizer.get_vocab()
    rare = max((t for t in vocab if t.startswith("Ġ") and len(t) > 8 and t[1:].isascii() and t[1:].isalpha()
                and vocab[t] < 128000), key=vocab.get)  # a rare whole word, e.g. " Something"
    cut = Vocabulary(tokenizer, 128256)
    plain = cut.kept(1000)
    kept = cut.kept(1000, always=[rare])
    assert vocab[rare] not in plain and vocab[rare] in kept and set(plain) < set(kept)
    pruned = prune_tokenizer(tokenizer, kept)
    assert pruned.convert_tokens_to_ids(rare) == kept.index(vocab[rare])
    assert pruned.decode(pruned(" " + rare[1:], add_special_tokens=False).input_ids) == " " + rare[1:]
    assert pruned(" " + rare[1:], add_special_tokens=False).input_ids == [kept.index(vocab[rare])]
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        cut.kept(1000, always=["no such token here"])


def test_fewer_embedding_rows_than_tokens_drops_the_rest(load):
    tokenizer = load("qwen2.5")
    kept = Vocabulary(tokenizer, 151645).kept(1000)  # keeps <|endoftext|> and <|im_start|>, not <|im_end|>
    assert kept[-2:] == [151643, 151644]
    pruned = prune_tokenizer(tokenizer, kept)
    assert len(pruned) == len(kept) and "<|im_end|>" not in pruned.get_vocab() and pruned.eos_token is None


def test_dropping_a_token_the_post_processor_inserts_is_refused(load):
    tokenizer = load("llama3.2")
    kept = [i for i in Vocabulary(tokenizer, 128256).kept(1000) if i != tokenizer.bos_token_id]
    with pytest.raises(ValueError, match="begin_of_text"):
        prune_tokenizer(tokenizer, kept)


@pytest.mark.parametrize("kept", [[5, 3], [1, 1, 2], [], [0, 10**6]])
def test_bad_kept_ids(load, kept):
    with pytest.raises(ValueError, match="kept_ids"):
        prune_tokenizer(load("llama2"), kept)


def _wrap(model) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model))


@pytest.mark.parametrize(
    "tokenizer",
    [
        _wrap(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]")),
        _wrap(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0, False)),
        _wrap(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])),  # can't spell unseen text
    ],
    ids=["wordpiece", "unigram", "bpe-without-bytes"],
)
def test_unsupported_tokenizer_types(tokenizer):
    with pytest.raises(ValueError, match="supports byte-level BPE"):
        Vocabulary(tokenizer, 3).kept(1)
    with pytest.raises(ValueError, match="supports byte-level BPE"):
        prune_tokenizer(tokenizer, [0, 1])


def test_roberta_post_processor_and_padding_are_renumbered():
    """A tiny byte-level BPE with RoBERTa's <s> ... </s> template and padding baked into tokenizer.json."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {"th": 256, "the": 257}
    backend = Tokenizer(models.BPE(vocab, [("t", "h"), ("th", "e")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>", "<pad>"])  # 258, 259, 260
    backend.post_processor = processors.RobertaProcessing(("</s>", 259), ("<s>", 258))
    backend.enable_padding(pad_id=260, pad_token="<pad>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    kept = Vocabulary(tokenizer, 261).kept(256)  # drops "th" and "the"
    assert kept == list(range(256)) + [258, 259, 260]
    pruned = prune_tokenizer(tokenizer, kept)
    assert pruned(["the", "a"], padding=True).input_ids == [[256, 116, 104, 101, 257], [256, 97, 257, 258, 258]]
    assert pruned.backend_tokenizer.padding["pad_id"] == pruned.pad_token_id == 258


class _SlowTiktoken(PythonBackend):
    """A minimal slow (python) tokenizer over a tiktoken file, as remote-code tokenizers are."""

    def __init__(self, vocab_file, **kwargs):
        self.vocab_file = vocab_file
        super().__init__(**kwargs)

    def get_vocab(self):
        return {}


def test_slow_tokenizer_is_converted_first(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"th", b"the", b" t", b" the", b"in", b"ing", b"er"]
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)]
    (tmp_path / "ranks.tiktoken").write_text("".join(lines))
    slow = _SlowTiktoken(str(tmp_path / "ranks.tiktoken"), eos_token="<|end|>", extra_special_tokens=["<|end|>"])
    kept = Vocabulary(slow, 300).kept(260)
    assert kept == list(range(260)) + [263]  # 256 bytes, th, the, " t", " the", then <|end|>
    pruned = prune_tokenizer(slow, kept)
    text = "the thing is in there, über 🙂"
    assert pruned.decode(pruned(text).input_ids) == text
    assert pruned("the end<|end|>").input_ids == [257, 32, 101, 110, 100, 260]
    assert pruned.eos_token_id == 260
    with pytest.raises(ValueError, match="cannot convert the slow tokenizer"):
        Vocabulary(_SlowTiktoken(None), 300).kept(10)
