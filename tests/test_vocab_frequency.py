"""Frequency-ordered vocabularies (compact.vocab.count_tokens / Vocabulary.kept / read_always_file).

Counts are learnt on the first half of sotu.txt's paragraphs and judged on the second half, with real tokenizers.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from compact import vocab as vocab_module
from compact.tokenizer import prune_tokenizer, special_token_ids
from compact.vocab import Vocabulary, count_tokens, read_always_file
from tokenizers_fixtures import llama2_tokenizer, llama32_tokenizer, qwen25_tokenizer, sotu_paragraphs, tiny_byte_level

# name -> (loader taking a scratch folder, embedding rows of the real model)
REAL = {
    "llama3.2": (lambda folder: llama32_tokenizer(), 128256),
    "qwen2.5": (lambda folder: qwen25_tokenizer(), 151936),
    "llama2": (llama2_tokenizer, 32000),
}
DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
# Llama 3.2 tokens unseen in sotu's first half, with ancestors that are unseen too
ALWAYS = ["ĠKubernetes", "Ġmitochond", "ĠPokemon"]


@pytest.fixture(scope="module")
def halves():
    paragraphs = sotu_paragraphs(10**9)
    half = len(paragraphs) // 2
    return paragraphs[:half], paragraphs[half:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, halves):
    """name -> the real tokenizer, its counts on the first half and its own round trip of the second half."""
    cache = {}

    def get(name):
        if name not in cache:
            loader, num_embeddings = REAL[name]
            tokenizer = loader(tmp_path_factory.mktemp(name))
            ids = tokenizer(halves[1]).input_ids
            model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
            cache[name] = SimpleNamespace(
                tokenizer=tokenizer, num_embeddings=num_embeddings, vocabulary=Vocabulary(tokenizer, num_embeddings),
                counts=count_tokens(tokenizer, halves[0], num_embeddings=num_embeddings),
                tokens=sum(map(len, ids)), expected=tokenizer.batch_decode(ids, **DECODE),
                bpe=_bpe_model(model), merges=_merges(model), bpe_vocab=set(model["vocab"]),
                merged={a + b for a, b in _merges(model)},
            )
        return cache[name]

    return get


@pytest.fixture(scope="module")
def prune(corpus, halves):
    """(name, N) -> frequency- and id-ordered selections at N, the pruned tokenizers and their second-half ids."""
    cache = {}

    def get(name, keep):
        if (name, keep) not in cache:
            base = corpus(name)
            tokenizer = base.tokenizer
            kept = base.vocabulary.kept(keep, order="frequency", counts=base.counts)
            by_id = base.vocabulary.kept(keep)
            pruned, pruned_by_id = prune_tokenizer(tokenizer, kept), prune_tokenizer(tokenizer, by_id)
            ids = pruned(halves[1]).input_ids
            cache[name, keep] = SimpleNamespace(
                base=base, keep=keep, kept=kept, pruned=pruned, ids=ids, tokens=sum(map(len, ids)),
                by_id=by_id, tokens_by_id=sum(map(len, pruned_by_id(halves[1]).input_ids)),
            )
        return cache[name, keep]

    return get


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _bpe_model(model: dict):
    """A tokenizer JSON's BPE model with ignore_merges off: tokenizing a token's string shows how BPE builds it."""
    return models.BPE(model["vocab"], _merges(model), byte_fallback=model["byte_fallback"], ignore_merges=False)


def _regular(tokenizer, num_embeddings: int, ids) -> list[int]:
    specials = set(special_token_ids(tokenizer))
    return [i for i in ids if i not in specials and i < num_embeddings]


def _check_closed(base, tokenizer, num_embeddings: int, kept: list[int], keep: int, pruned) -> None:
    """Ascending, exactly ``keep`` regular tokens, specials and base symbols kept, every kept merged token buildable."""
    assert kept == sorted(set(kept)), "not ascending and unique"
    rows = min(len(tokenizer), num_embeddings)
    assert kept[-1] < rows
    assert {i for i in special_token_ids(tokenizer) if i < rows} <= set(kept), "a special/added token was dropped"
    assert len(_regular(tokenizer, num_embeddings, kept)) == keep, "not exactly keep regular tokens"
    assert vocab_module._base_symbol_ids(tokenizer, tokenizer.get_vocab()) <= set(kept), "a base symbol was dropped"
    # every kept merged token is a merge of two kept tokens ...
    tokens = set(tokenizer.convert_ids_to_tokens(kept))
    built = {a + b for a, b in base.merges if a in tokens and b in tokens}
    orphans = sorted(t for t in tokens & base.merged if t not in built)
    assert not orphans, f"kept merged tokens no merge of kept tokens builds: {orphans[:5]}"
    # ... and, stronger, the pruned tokenizer builds each one from its string (when the original could)
    pruned_bpe = _bpe_model(json.loads(pruned.backend_tokenizer.to_str())["model"])
    lost = [t for t in tokens & base.bpe_vocab
            if [x.value for x in base.bpe.tokenize(t)] == [t] and [x.value for x in pruned_bpe.tokenize(t)] != [t]]
    assert not lost, f"kept tokens the pruned tokenizer can no longer build: {lost[:5]}"


CASES = [(n, k) for n in ("llama3.2", "qwen2.5") for k in (2000, 8000)]


@pytest.mark.parametrize("name,keep", CASES)
def test_selection_is_closed_and_exact(prune, name, keep):
    case = prune(name, keep)
    _check_closed(case.base, case.base.tokenizer, case.base.num_embeddings, case.kept, keep, case.pruned)


@pytest.mark.parametrize("name,keep", CASES)
def test_fewer_tokens_than_id_order(prune, name, keep):
    """Same number of kept ids, fewer tokens on held-out text (measured: ~15% fewer on sotu at 2000 and 8000)."""
    case = prune(name, keep)
    assert len(case.kept) == len(case.by_id)
    print(f"\n{name} N={keep}: second half = {case.tokens} tokens by frequency, {case.tokens_by_id} by id "
          f"({case.tokens / case.tokens_by_id:.3f}x), {case.base.tokens} unpruned")
    assert case.tokens < case.tokens_by_id


@pytest.mark.parametrize("name,keep", CASES)
def test_round_trip_and_only_kept_ids(prune, halves, name, keep):
    case = prune(name, keep)
    assert max(map(max, case.ids)) < len(case.kept)
    decoded = case.pruned.batch_decode(case.ids, **DECODE)
    changed = [t[:40] for t, d, e in zip(halves[1], decoded, case.base.expected) if d != e or e != t]
    assert not changed, f"round trip changed {len(changed)} paragraphs, e.g. {changed[:3]}"


@pytest.mark.parametrize("name,keep", CASES)
def test_token_strings_follow_kept_ids(prune, name, keep):
    case = prune(name, keep)
    assert len(case.pruned) == len(case.kept)
    old = case.base.tokenizer.convert_ids_to_tokens(case.kept)
    assert case.pruned.convert_ids_to_tokens(list(range(len(case.kept)))) == old


def test_llama2_sentencepiece(corpus, halves):
    """SentencePiece BPE: characters (merge leaves, at the end of the vocabulary) come in as ancestors."""
    base = corpus("llama2")
    tokenizer, keep = base.tokenizer, 2000
    kept = base.vocabulary.kept(keep, order="frequency", counts=base.counts)
    pruned = prune_tokenizer(tokenizer, kept)
    _check_closed(base, tokenizer, base.num_embeddings, kept, keep, pruned)
    assert max(kept) > 29000, "no character token (they sit at the end of Llama 2's vocabulary) was kept"
    ids = pruned(halves[1]).input_ids
    assert max(map(max, ids)) < len(kept)
    assert pruned.batch_decode(ids, **DECODE) == base.expected
    by_id = prune_tokenizer(tokenizer, base.vocabulary.kept(keep))
    assert sum(map(len, ids)) < sum(map(len, by_id(halves[1]).input_ids))


def test_always_tokens_are_kept_with_their_ancestors(corpus, prune, tmp_path):
    base = corpus("llama3.2")
    tokenizer, num_embeddings, keep = base.tokenizer, base.num_embeddings, 2000
    ids = tokenizer.convert_tokens_to_ids(ALWAYS)
    assert not base.counts[ids].any(), "the always tokens should be unseen in the counts"
    path = tmp_path / "always.txt"
    path.write_bytes(("\n".join(ALWAYS) + "\r\n\n  \n" + ALWAYS[0] + "\n").encode())
    assert read_always_file(path) == ALWAYS
    kept = base.vocabulary.kept(keep, order="frequency", counts=base.counts, always=read_always_file(path))
    pruned = prune_tokenizer(tokenizer, kept)
    assert set(ids) <= set(kept)
    _check_closed(base, tokenizer, num_embeddings, kept, keep, pruned)
    for token in ALWAYS:  # the pruned tokenizer still emits them as one token
        text = tokenizer.convert_tokens_to_string([token])
        assert pruned.convert_ids_to_tokens(pruned(text, add_special_tokens=False).input_ids) == [token]
    assert not set(ids) & set(prune("llama3.2", keep).kept)  # kept only because they are named


def test_unknown_always_token_is_named(corpus):
    base = corpus("llama3.2")
    with pytest.raises(ValueError, match=r"--vocab-always: ' the' is not a token.*'Ġthe'"):
        base.vocabulary.kept(100, order="frequency", counts=base.counts, always=["Ġthe", " the"])
    with pytest.raises(ValueError, match="no embedding row"):  # Llama 3.2's <|image|> is beyond the 128256 rows
        base.vocabulary.kept(100, order="frequency", counts=base.counts, always=["<|image|>"])
    with pytest.raises(ValueError, match="--vocab-keep"):
        base.vocabulary.kept(128001, order="frequency", counts=base.counts)
    with pytest.raises(ValueError, match="counts must be"):
        base.vocabulary.kept(100, order="frequency", counts=base.counts[:-1])


def test_read_always_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt: --vocab-always file not found"):
        read_always_file(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="blank.txt: .*no token strings"):
        read_always_file(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: .*not UTF-8"):
        read_always_file(tmp_path / "latin1.txt")
    (tmp_path / "bom.txt").write_bytes("\ufeff▁the\r\n<0x0A>\n".encode())
    assert read_always_file(tmp_path / "bom.txt") == ["▁the", "<0x0A>"]


def test_no_tokenizer_keeps_the_most_frequent_rows():
    counts = torch.tensor([5, 0, 7, 5, 1, 0, 9, 0])
    rows, freq = Vocabulary(None, 8), {"order": "frequency", "counts": counts}
    assert rows.kept(3, **freq) == [0, 2, 6]
    assert rows.kept(4, **freq) == [0, 2, 3, 6]  # tie 5/5: lower id first
    assert Vocabulary(None, 8, extra_ids=[7, None, [5]]).kept(6, **freq) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert rows.kept(8, order="frequency", counts=np.zeros(8)) == list(range(8))
    with pytest.raises(ValueError, match="--vocab-keep"):
        rows.kept(9, **freq)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        rows.kept(3, **freq, always=["a"])


def test_count_tokens_on_ids_matches_a_naive_count():
    rng = np.random.default_rng(0)
    items = [torch.from_numpy(rng.integers(0, 50, (3, 17))), rng.integers(0, 50, 11).astype(np.uint16),
             [4, 4, 49], torch.tensor([], dtype=torch.long), torch.arange(50)[::3]]
    naive = Counter(int(i) for item in items for i in np.asarray(item).ravel())
    counts = count_tokens(None, iter(items), num_embeddings=53)
    assert counts.dtype == torch.int64 and counts.tolist() == [naive[i] for i in range(53)]
    assert count_tokens(None, torch.tensor([[1, 1], [2, 0]]), num_embeddings=3).tolist() == [1, 2, 1]
    assert count_tokens(None, [], num_embeddings=4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"\[0, 50\).*max 50"):
        count_tokens(None, [torch.tensor([3, 50])], num_embeddings=50)
    with pytest.raises(ValueError, match="min -100"):
        count_tokens(None, [torch.tensor([-100, 3])], num_embeddings=50)
    with pytest.raises(TypeError, match="integer token ids"):
        count_tokens(None, [torch.tensor([1.0])], num_embeddings=50)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        count_tokens(None, ["text"], num_embeddings=50)


def test_count_tokens_on_text_matches_a_naive_count(corpus, halves, monkeypatch):
    base = corpus("llama3.2")
    tokenizer, texts = base.tokenizer, halves[0][:300] + ["<|image|> is an added token without an embedding row"]
    naive = Counter(i for ids in tokenizer(texts, add_special_tokens=False).input_ids for i in ids)
    assert naive[128256] == 1
    monkeypatch.setattr(vocab_module, "_COUNT_BATCH_CHARS", 5000)  # many batches
    counts = count_tokens(tokenizer, (t for t in texts), num_embeddings=base.num_embeddings)
    assert counts.tolist() == [naive[i] for i in range(base.num_embeddings)]
    one = count_tokens(tokenizer, texts[0], num_embeddings=base.num_embeddings)  # a single string
    assert one.sum() == len(tokenizer(texts[0], add_special_tokens=False).input_ids)
    backend = tokenizer.backend_tokenizer  # a plain tokenizers.Tokenizer, text and ids mixed
    mixed = count_tokens(backend, [texts[0], torch.tensor([0, 0])], num_embeddings=base.num_embeddings)
    one[0] += 2
    assert torch.equal(mixed, one)


def test_parents_follow_the_bpe_path_not_the_first_merge():
    """"abc" is first listed as ab+c, yet BPE builds it as a+bc (b c merges first): bc is its parent."""
    tokenizer = tiny_byte_level([("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")])
    vocab = tokenizer.get_vocab()
    counts = torch.zeros(len(vocab), dtype=torch.long)
    counts[vocab["abc"]], counts[vocab["ab"]] = 10, 5
    cut = Vocabulary(tokenizer, len(vocab))
    kept = cut.kept(258, order="frequency", counts=counts)
    assert kept == list(range(256)) + [vocab["bc"], vocab["abc"]]
    pruned = prune_tokenizer(tokenizer, kept)
    assert pruned.convert_ids_to_tokens(pruned("abc").input_ids) == ["abc"]
    # one slot: abc (two missing) is skipped for ab (one missing); three slots: all
    assert cut.kept(257, order="frequency", counts=counts) == list(range(256)) + [vocab["ab"]]
    assert cut.kept(259, order="frequency", counts=counts) == list(range(259))


def test_merges_as_strings():
    """Older tokenizer.json files write merges as "a b" strings."""
    state = json.dumps({"vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}, "merges": ["a b", "ab c"]})
    tree = vocab_module._MergeTree(SimpleNamespace(model=SimpleNamespace(__getstate__=lambda: state)))
    assert tree.parents(4) == (3, 2) and tree.parents(3) == (0, 1) and tree.parents(0) == ()
    assert sorted(tree.closure(4, {0}, set(range(5)))) == [1, 2, 3, 4]
    assert tree.closure(4, set(), {0, 1, 2, 4}) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_count_tokens_on_the_gpu():
    ids = torch.randint(0, 1000, (4, 4096))
    counts = count_tokens(None, [ids.cuda(), ids[0].numpy()], num_embeddings=1000)
    assert counts.device.type == "cpu" and torch.equal(counts, torch.bincount(torch.cat([ids.ravel(), ids[0]]), minlength=1000))


def test_characters_behind_a_multi_character_base_symbol_are_kept():
    """A decoder Replace string ("éé") is a base symbol, kept whatever the cut; the closure of "ééa" stops there,
    so only the last step (kept tokens' characters) brings in the "é" the cut tokenizer needs to build "éé"."""
    ids = {f"<0x{b:02X}>": b for b in range(256)} | {"a": 256, "é": 257, "éé": 258, "ééa": 259}
    backend = Tokenizer(models.BPE(ids, [("é", "é"), ("éé", "a")], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("éé", "X"), decoders.ByteFallback(), decoders.Fuse()])
    counts = torch.zeros(260)
    counts[259] = 10
    cut = Vocabulary(PreTrainedTokenizerFast(tokenizer_object=backend), 260)
    assert cut.kept(259, order="frequency", counts=counts) == list(range(260))  # 259 asked, "é" on top
