"""The vocabulary policy on a real SentencePiece vocabulary (Llama 2, whose digits and punctuation sit at the
highest ids): what a cut keeps in every order, what the budget planner counts, and which passes a prune runs."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from compact import budget, cli, vocab
from compact.tokenizer import prune_tokenizer
from tokenizers_fixtures import llama2_tokenizer, sotu_paragraphs

TEXTS = ["1993", "140 billion", "In 1993, it was 3.5% (or $140 billion)."]


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    return llama2_tokenizer(tmp_path_factory.mktemp("llama2"))  # skips when ../shared/data is absent


@pytest.fixture(scope="module")
def model_dir(llama2, tmp_path_factory):
    """A tiny random Llama with Llama 2's 32000-token vocabulary and tokenizer, and a calibration text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("model")
    config = LlamaConfig(vocab_size=32000, hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder / "src")
    llama2.save_pretrained(folder / "src")
    (folder / "calib.txt").write_text("\n\n".join(sotu_paragraphs(40)), encoding="utf-8")
    return folder


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)


def _half(llama2) -> int:
    return len(vocab.Vocabulary(llama2, 32000).regular) // 2


def _cut(llama2, model, order: str, always=()):
    counts = vocab.count_tokens(llama2, sotu_paragraphs(40), num_embeddings=32000) if order == "frequency" else None
    kept = vocab.Vocabulary.of(model, llama2).kept(_half(llama2), order=order, counts=counts, always=always)
    return kept, prune_tokenizer(llama2, kept)


@pytest.fixture(scope="module")
def bare_model():
    """Only what Vocabulary.of reads: the embedding rows and the config's token ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4, intermediate_size=4, num_hidden_layers=1,
                         num_attention_heads=1, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("order", ["id", "frequency"])
def test_digits_and_punctuation_survive_half_the_vocabulary(llama2, bare_model, order):
    """'1993' is '▁ 1 9 9 3' and the digits are ids 29896-29955: a cut to half the vocabulary keeps them (and
    the ASCII punctuation), so numbers encode with the same pieces; '▁billion' (id 24464) goes in id order."""
    kept, cut = _cut(llama2, bare_model, order)
    assert len(kept) < 32000 * 0.55
    for text in ("1993", "3.5", "7,006"):
        assert _pieces(cut, text) == _pieces(llama2, text), text
    assert _pieces(cut, "140 billion")[:4] == ["▁", "1", "4", "0"]
    ids = llama2.get_vocab()
    assert all(ids[c] in kept for c in "0123456789.,;:!?$%()-'\"")


@pytest.mark.parametrize("order", ["id", "frequency"])
def test_vocab_always_works_in_every_order(llama2, bare_model, order):
    kept, cut = _cut(llama2, bare_model, order, always=["▁billion"])
    assert llama2.get_vocab()["▁billion"] in kept
    for text in TEXTS:
        assert _pieces(cut, text) == _pieces(llama2, text), text


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("order", ["id", "frequency"])
def test_planner_counts_what_the_pruned_model_keeps(llama2, model_dir, tmp_path, order):
    """The chosen split's parameter count is the pruned model's, and its token loss is the share of calibration
    tokens the kept vocabulary really drops (always so in id order; in frequency order the planner prices along
    the keep order, which the selection follows exactly on this text)."""
    calib, out = model_dir / "calib.txt", tmp_path / "out"
    rc, _, stderr = _run(["prune", model_dir / "src", "--out", out, "--target-params", "0.6", "--ffn-multiple", "16",
                          "--vocab-order", order, "--calib", calib, "--samples", "4", "--seq-len", "64", "--quiet"])
    assert rc == 0, stderr
    report = json.loads((out / "compact_report.json").read_text())
    chosen = next(c for c in report["plan"]["candidates"] if c["chosen"])
    assert chosen["parameters"] == report["parameters"]["after"]["total"]
    assert chosen["vocab_rows"] == report["sizes"]["vocab_after"]
    counts = vocab.count_tokens(llama2, [calib.read_text(encoding="utf-8")], num_embeddings=32000).double()
    dropped = 1 - float(counts[report["kept_token_ids"]].sum() / counts.sum())
    assert chosen["token_loss"] == pytest.approx(dropped, abs=1e-12)  # float64 sums of ~1e4 integer counts


def test_vocabulary_only_prune_runs_no_scoring_pass(model_dir, tmp_path):
    out = tmp_path / "out"
    rc, _, stderr = _run(["prune", model_dir / "src", "--out", out, "--vocab-keep", "8000", "--calib",
                          model_dir / "calib.txt", "--vocab-order", "frequency", "--quiet"])
    assert rc == 0, stderr
    report = json.loads((out / "compact_report.json").read_text())
    assert {"calibration", "scoring"}.isdisjoint(report["timings_s"]), report["timings_s"]
    assert "token counts" in report["timings_s"]
    assert report["sizes"]["intermediate_after"] == report["sizes"]["intermediate_before"]
    assert not (out / "compact_scores.safetensors").exists()


@pytest.mark.parametrize("value,ok", [("1", False), ("1ch", True), ("1.0", True)])
def test_ffn_keep_one_must_say_what_it_means(model_dir, tmp_path, value, ok):
    rc, _, stderr = _run(["prune", model_dir / "src", "--out", tmp_path / "out", "--ffn-keep", value,
                          "--ffn-criterion", "magnitude", "--quiet"])
    if ok:
        assert rc == 0, stderr
        kept = json.loads((tmp_path / "out" / "compact_report.json").read_text())["sizes"]["intermediate_after"]
        assert kept == (1 if value == "1ch" else 64)
    else:
        assert rc == 2 and "ambiguous: write 1ch" in stderr, stderr


def test_budget_curve_rows_match_kept_vocabulary(llama2, bare_model):
    """keep_curve's prefix plus base_rows is what the policy keeps, at every N tried, in id order."""
    cut = vocab.Vocabulary.of(bare_model, llama2)
    regular = len(cut.regular)
    assert cut.base_rows == len(cut.kept(regular)) - regular
    curve = budget.vocab_curve(torch.ones(32000), *cut.keep_curve("id"), cut.base_rows)
    for n in (1, 100, 5000, 16000, regular):
        assert int(curve.rows[n]) == len(cut.kept(n)), n
