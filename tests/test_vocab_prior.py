"""--vocab-prior: frequency order's counts blended with the tokenizer's own prior (compact.vocab.Vocabulary.blend
and .prior), and the option's way from the command line to the method."""

from __future__ import annotations

import pytest
import torch

from compact import cli
from compact.options import CalibOptions, Method, check_method, signature
from compact.tokenizer import special_token_ids
from compact.vocab import Vocabulary, count_tokens
from tokenizers_fixtures import llama2_tokenizer, llama32_tokenizer, qwen25_tokenizer, sotu_paragraphs, tiny_byte_level

MERGES = [("t", "h"), ("th", "e"), ("a", "n"), ("an", "d"), ("o", "f"), ("x", "y")]
REAL = {  # name -> (loader taking a scratch folder, embedding rows, how the vocabulary spells " the")
    "llama3.2": (lambda folder: llama32_tokenizer(), 128256, "Ġthe"),
    "qwen2.5": (lambda folder: qwen25_tokenizer(), 151936, "Ġthe"),
    "llama2": (llama2_tokenizer, 32000, "▁the"),
}


def _tiny() -> tuple[Vocabulary, dict[str, int], torch.Tensor]:
    """A byte-level BPE (ids 0-255 the bytes, then one token per merge in rank order) and counts that favour
    its last merges."""
    tokenizer = tiny_byte_level(MERGES)
    vocab = tokenizer.get_vocab()
    counts = count_tokens(tokenizer, ["xy xy xy xy of of of and"], num_embeddings=len(vocab))
    return Vocabulary(tokenizer, len(vocab)), vocab, counts


def test_weight_zero_is_todays_order():
    cut, _, counts = _tiny()
    assert cut.blend(counts, 0.0) is counts or torch.equal(cut.blend(counts, 0.0), counts)
    assert cut.blend(counts, 0.0).dtype == torch.int64
    for keep in (256, 258, 260):
        assert cut.kept(keep, order="frequency", counts=counts, prior=0.0) == cut.kept(keep, order="frequency",
                                                                                       counts=counts)
    assert cut.keep_curve("frequency", counts, prior=0.0) == cut.keep_curve("frequency", counts)


def test_a_large_weight_follows_merge_order():
    """Counts alone keep xy and of first; a prior that outweighs them keeps the earliest merges, as id order."""
    cut, vocab, counts = _tiny()
    assert cut.kept(258, order="frequency", counts=counts) == [*range(256), vocab["of"], vocab["xy"]]
    for keep in (257, 258, 259, 261):
        assert cut.kept(keep, order="frequency", counts=counts, prior=1e6) == cut.kept(keep, order="id")
    ids, _ = cut.keep_curve("frequency", counts, prior=1e6)
    assert ids[256:] == [vocab[a + b] for a, b in MERGES]


def test_the_policy_and_the_curve_rank_by_the_same_pseudo_counts():
    """The prune's cut and the planner's curve both follow counts + weight * N * prior."""
    cut, _, counts = _tiny()
    pseudo = cut.blend(counts, 0.5)
    assert torch.allclose(pseudo, counts + 0.5 * int(counts.sum()) * cut.prior)
    assert cut.keep_curve("frequency", counts, prior=0.5) == cut.keep_curve("frequency", pseudo)
    for keep in range(256, 263):
        assert cut.kept(keep, order="frequency", counts=counts, prior=0.5) == cut.kept(keep, order="frequency",
                                                                                       counts=pseudo)


def test_the_tiny_prior_is_zipf_over_merge_rank():
    cut, vocab, _ = _tiny()
    p = cut.prior
    ranks = {vocab[a + b]: 256 + r for r, (a, b) in enumerate(MERGES)}
    for token_id, rank in ranks.items():
        assert p[token_id] / p[0] == pytest.approx(256 / (rank + 256))
    assert float(p.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(REAL))
def test_the_prior_of_a_real_tokenizer(name, tmp_path):
    """A distribution over the regular tokens that ranks " the" among its top 2% (just past the base symbols)
    and follows the text: the tokens sotu uses most weigh several times more than those it never uses."""
    loader, rows, the = REAL[name]
    tokenizer = loader(tmp_path)
    cut = Vocabulary(tokenizer, rows)
    p = cut.prior
    regular = torch.as_tensor(cut.regular)
    assert p.dtype == torch.float64 and p.shape == (rows,)
    assert float(p.sum()) == pytest.approx(1.0) and bool((p[regular] > 0).all())
    assert float(p[[i for i in special_token_ids(tokenizer) if i < rows]].sum()) == 0.0
    assert int((p[regular] > p[tokenizer.convert_tokens_to_ids(the)]).sum()) < len(regular) // 50
    counts = count_tokens(tokenizer, sotu_paragraphs(200), num_embeddings=rows)[regular]
    top = counts.argsort(descending=True)[:500]
    assert p[regular][top].mean() > 5 * p[regular][counts == 0].mean()


def test_the_option_reaches_the_method_and_the_signature():
    args = cli._parser().parse_args(["prune", "m", "--out", "o", "--target-params", "0.6", "--calib", "c.txt",
                                     "--vocab-prior", "0.2"])
    groups = cli._groups(args)
    assert groups["method"].vocab_prior == 0.2
    plain = Method(target_params=0.6)
    assert signature(groups["method"], groups["calib"], "m", "float32") != signature(plain, groups["calib"], "m",
                                                                                     "float32")


@pytest.mark.parametrize("method,words", [
    (Method(target_params=0.6, vocab_order="id", vocab_prior=0.2), "--vocab-prior blends the token counts"),
    (Method(ffn_keep=0.5, vocab_prior=0.2), "--vocab-prior needs calibration data"),
])
def test_a_prior_it_cannot_use_is_refused(method, words):
    calib = CalibOptions("c.txt") if method.vocab_order == "id" else CalibOptions()
    with pytest.raises(ValueError, match=words):
        check_method(method, calib, prune=True)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), True])
def test_a_weight_outside_zero_to_infinity_is_refused(value):
    with pytest.raises(ValueError, match="--vocab-prior must be a number of at least 0"):
        Method(vocab_prior=value)
