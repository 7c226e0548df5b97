"""Measured planning (compact.trials): the best-priced splits are pruned and read on held-out calibration rows."""
import json
import math

import pytest
import torch

from compact import cli, evaluate, loading, pruning
from compact.demo import train_tokenizer
from compact.options import CalibOptions
from kernel_ops.tolerances import decoder_rtol
from tokenizers_fixtures import sotu_paragraphs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A byte-level BPE tokenizer trained on sotu paragraphs and a random tiny Llama of its vocabulary, saved
    together; calibration text of other paragraphs."""
    import tiny_models
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("trials")
    paragraphs = sotu_paragraphs(160)
    tokenizer = train_tokenizer(paragraphs[:80], vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text("\f".join(paragraphs[80:]), encoding="utf-8")
    assert tiny_models  # the shared builder's module is importable here (tests/ on the path)
    return root


ARGS = ["--target-params", "0.8", "--ffn-multiple", "8", "--samples", "8", "--seq-len", "64", "--plan-trials", "3"]


def test_plan_prunes_the_best_priced_splits_and_keeps_the_best_measured(small, tmp_path):
    """The measured figure of the chosen split is the bits/byte the written checkpoint reads on the held-out
    rows (the 2 rows after --samples 8), re-read by its cut tokenizer; it is the least of the trials."""
    out = tmp_path / "pruned"
    assert cli.main(["prune", str(small / "model"), "--out", str(out), "--calib", str(small / "calib.txt"),
                     "--quiet", *ARGS]) == 0
    report = json.loads((out / "compact_report.json").read_text())
    measured = report["plan"]["measured"]
    assert len(measured) == 3 and sum(m["chosen"] for m in measured) == 1
    chosen = next(m for m in measured if m["chosen"])
    assert chosen["bits_per_byte"] == min(m["bits_per_byte"] for m in measured)
    assert (report["sizes"]["intermediate_after"], report["options"]["calib_samples"]) == (chosen["ffn_keep"], 8)

    source = loading.load(str(small / "model"), dtype="float32")
    rows = pruning.calibrate(source, CalibOptions(str(small / "calib.txt"), samples=10, seq_len=64))
    pruned = loading.load(str(out), dtype="float32")
    ids, mask = [], []
    for row in rows.input_ids[8:]:
        text = source.tokenizer.decode(row.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        ids.append(pruned.tokenizer(text)["input_ids"])
    length = max(map(len, ids))
    batch = torch.tensor([r + [0] * (length - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in ids])
    total, _ = evaluate.nll(pruned.model, batch, mask, batch_size=1, progress=False)
    want = total / math.log(2) / evaluate.text_bytes(pruned.tokenizer, batch, mask)
    rtol = decoder_rtol(pruned.model.config, length)  # float32 forwards of the same model, rounded differently
    assert chosen["bits_per_byte"] == pytest.approx(want, rel=rtol), "the trial is not the written model"


def test_plan_shows_priced_and_measured_and_trials_can_be_off(small, capsys):
    common = ["plan", str(small / "model"), "--calib", str(small / "calib.txt"), *ARGS]
    assert cli.main(common) == 0
    shown = capsys.readouterr().out
    assert "measured: the best-priced splits pruned and read on 2 calibration rows after the 8 fitted" in shown
    assert "held-out bits/byte" in shown and shown.count("\n*") == 2  # the choice, in both tables
    assert cli.main([*common, "--plan-trials", "0"]) == 0
    assert "measured" not in capsys.readouterr().out
