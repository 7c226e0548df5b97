"""Budget planner (--target-params) and the frequency-ordered vocabulary through the pipeline."""
import json

import pytest
import torch

from compact import budget, cli, demo, demo_text


def test_target_params_lands_within_one_percent(stories, tmp_path, capsys, compute):
    ckpt, calib, _ = stories
    for order in ("id", "frequency"):
        out = tmp_path / order
        assert cli.main(["prune", str(ckpt), "--out", str(out), "--target-params", "0.65", "--ffn-multiple", "4",
                         "--vocab-order", order, "--calib", str(calib), "--quiet", *compute.args]) == 0
        report = json.loads((out / "compact_report.json").read_text())
        kept = report["parameters"]["after"]["total"] / report["parameters"]["before"]["total"]
        assert abs(kept - 0.65) <= 0.01, f"{order}: kept {kept:.4f}"
        chosen = [c for c in report["plan"]["candidates"] if c["chosen"]]
        assert len(chosen) == 1 and report["plan"]["rule"]
        assert report["sizes"]["intermediate_after"] == chosen[0]["ffn_keep"]
        assert all(abs(c["fraction"] - 0.65) <= 0.01 for c in report["plan"]["candidates"])
        assert chosen[0]["cost"] == min(c["cost"] for c in report["plan"]["candidates"])
        # named as `compact plan` and the summary name it: cross-fitted in frequency order, absent in id order
        assert "heldout_loss" not in chosen[0] and (chosen[0]["cross_fitted_loss"] is None) == (order == "id")
    assert cli.main(["plan", str(ckpt), "--calib", str(calib), "--target-params", "0.65", "--ffn-multiple", "4",
                     "--quiet", *compute.args]) == 0
    assert "choice: --vocab-keep" in capsys.readouterr().out


def _accounting(vocab, hidden, layers, inter, tied=True):
    per_row = hidden if tied else 2 * hidden
    fixed = layers * 4 * hidden * hidden
    total = fixed + vocab * per_row + inter * 3 * layers * hidden
    return budget.Accounting(total, fixed, per_row, 3 * layers * hidden, inter), vocab


def _curve(counts):
    """Every row a regular token, kept in id order."""
    n = counts.numel()
    return budget.vocab_curve(counts, list(range(n)), list(range(n + 1)), 0)


def test_rule_prefers_vocabulary_cuts_on_small_models_and_ffn_cuts_on_large():
    """Same token and act^2 evidence; only the parameter accounting differs."""
    def evidence(vocab, inter, layers):
        zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
        scores = {f"model.layers.{i}.mlp": torch.linspace(1, 0.01, inter, dtype=torch.float64) for i in range(layers)}
        return _curve(zipf), scores

    small = _accounting(vocab=151_936, hidden=896, layers=24, inter=4864)       # Qwen2.5-0.5B-like
    large = _accounting(vocab=128_256, hidden=8192, layers=80, inter=28672)     # Llama-3.1-70B-like
    picks = {}
    for name, (acc, vocab) in (("small", small), ("large", large)):
        curve, scores = evidence(vocab, acc.intermediate, 4)
        choice, _ = budget.choose_split(acc, 0.8, curve, budget.score_loss_curve(scores), multiple=64)
        picks[name] = (choice.vocab_keep / vocab, choice.ffn_keep / acc.intermediate)
        assert abs(choice.fraction - 0.8) <= 0.01
    assert picks["small"][0] < picks["small"][1], f"small model should cut vocabulary more: {picks['small']}"
    assert picks["large"][1] < picks["large"][0], f"large model should cut FFN more: {picks['large']}"


def test_unreachable_target_is_a_clear_error():
    acc, _ = _accounting(vocab=1000, hidden=64, layers=2, inter=128)
    curve = _curve(torch.ones(1000))
    scores = {"model.layers.0.mlp": torch.ones(128, dtype=torch.float64)}
    with pytest.raises(ValueError, match="cannot be met within 1%"):
        budget.choose_split(acc, 0.01, curve, budget.score_loss_curve(scores), multiple=64)


def test_frequency_order_prunes_a_consistent_tokenizer(tmp_path):
    """A byte-level BPE model pruned by either order: lossless, only kept ids, rows and strings line up.

    (Which order costs fewer tokens depends on the text: on this tokenizer's own training distribution id
    order is already near frequency order; on other text frequency order wins, see test_vocab_frequency.)"""
    from transformers import AutoTokenizer

    texts = demo_text.stories(200, seed=1)
    tokenizer = demo.train_tokenizer(texts)
    model = demo.build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    calib = tmp_path / "calib.txt"
    calib.write_text("\f".join(demo_text.stories(60, seed=2)))
    held_out = demo_text.stories(40, seed=3)
    lengths = {}
    for order in ("id", "frequency"):
        out = tmp_path / order
        assert cli.main(["prune", str(base), "--out", str(out), "--vocab-keep", "350", "--vocab-order", order,
                         "--calib", str(calib), "--seq-len", "128", "--quiet"]) == 0
        pruned = AutoTokenizer.from_pretrained(out)
        kept = json.loads((out / "compact_report.json").read_text())["kept_token_ids"]
        lengths[order] = 0
        for text in held_out:
            ids = pruned(text, add_special_tokens=False).input_ids
            assert max(ids) < len(kept) and pruned.decode(ids) == text
            lengths[order] += len(ids)
        assert pruned.convert_ids_to_tokens(list(range(len(kept)))) == tokenizer.convert_ids_to_tokens(kept)
    print("held-out tokens by vocabulary order:", lengths)


@pytest.mark.parametrize("case", ["llama", "gemma3_text"])
def test_the_planner_prices_the_refit_except_where_the_mlp_output_is_normalized(case, tmp_path):
    """--target-params with the default re-fit: the plan prices each FFN cut by the error share the re-fit leaves
    (its candidates' score_loss below the plain act^2 share), but not for Gemma 2/3, whose prune still re-fits."""
    import numpy as np

    import tiny_models
    from compact import loading, pruning
    from compact.options import CalibOptions, Method, Run

    np.save(tmp_path / "calib.npy", np.random.default_rng(0).integers(0, tiny_models.VOCAB, size=(8, 32)))
    loaded = loading.held(tiny_models.build(case))
    calib = CalibOptions(str(tmp_path / "calib.npy"), samples=8, seq_len=32)
    decide = lambda refit: pruning.decide(loaded, Method(target_params=0.8, ffn_multiple=8, refit=refit),  # noqa: E731
                                          calib, Run(progress=False), upto="planning")
    default, plain = decide("auto"), decide("none")
    normalized = case == "gemma3_text"
    assert default.method.refit == "sequential" and default.plan.refit == ("none" if normalized else "sequential")
    priced = {c.ffn_keep: c.score_loss for c in default.plan.candidates}
    unpriced = {c.ffn_keep: c.score_loss for c in plain.plan.candidates}
    cut = [k for k in priced if k in unpriced and k < tiny_models.INTER]
    assert cut and all((priced[k] == unpriced[k]) == normalized for k in cut)
