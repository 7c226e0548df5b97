"""The Python API (compact.decide / apply / prune) on a model in memory: a frozen decision that changes nothing,
the cut it describes, and one-line errors for what a careless caller passes. (README's example against
`compact prune` on SmolLM2: tests/test_real_model.py.)"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import compact
import tiny_models


@pytest.fixture()
def calib(tmp_path):
    np.save(tmp_path / "calib.npy", np.arange(128).reshape(4, 32) % 60)
    return compact.CalibOptions(str(tmp_path / "calib.npy"), samples=4, seq_len=32)


def test_decide_changes_nothing_and_apply_cuts_as_decided(calib):
    model = tiny_models.build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decision = compact.decide(model, None, calib, compact.Method(vocab_keep=40, ffn_keep="24ch"),
                              compact.Run(progress=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.ffn_keep = 8
    assert decision.method.refit == "sequential" and decision.refits  # the default re-fit, resolved
    pruned, tokenizer, report = compact.apply(model, None, decision)
    assert pruned is model and tokenizer is None
    assert model.get_input_embeddings().num_embeddings == len(decision.kept_token_ids)
    assert all(mlp.down_proj.in_features == 24 for mlp in (layer.mlp for layer in model.model.layers))
    assert report["kept_channels"] == [list(kept) for kept in decision.kept_channels.values()]
    assert report["parameters"]["after"]["total"] == sum(p.numel() for p in model.parameters())


def test_a_decision_and_everything_it_holds_is_frozen(calib):
    """Fields, the planner's record and its rows, the check, the per-layer maps and the id lists are read-only."""
    model = tiny_models.build("llama")
    decision = compact.decide(model, None, calib, compact.Method(target_params=0.8, ffn_multiple=8),
                              compact.Run(check=True, progress=False))
    plan, name = decision.plan, next(iter(decision.kept_channels))
    assert plan.chosen.ffn_keep == decision.ffn_keep and decision.check.ok and decision.refits
    assert len(decision.kept_token_ids) == decision.sizes.vocab_after < decision.sizes.vocab_before
    for record, field in ((decision, "plan"), (plan, "target"), (plan.candidates[0], "chosen"),
                          (decision.check, "ok"), (decision.sizes, "vocab_after")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, None)
    for mapping in (decision.scores, decision.kept_channels, decision.refits, decision.parameters_before,
                    decision.timings):
        with pytest.raises(TypeError):
            mapping["model.layers.0.mlp"] = None
    with pytest.raises(AttributeError):
        decision.kept_channels[name].append(0)
    with pytest.raises(TypeError):
        decision.kept_token_ids[0] = 1
    assert isinstance(plan.candidates, tuple)


@pytest.mark.parametrize("fields, said", [
    (dict(vocab_keep=0), "--vocab-keep must be positive"),
    (dict(vocab_keep=2.5), r"--vocab-keep as a ratio must be in \(0, 1\]"),
    ({"vocab_keep": "1"}, "--vocab-keep 1 is ambiguous: write 1tok"),
    (dict(ffn_keep=-0.5), "--ffn-keep must be positive"),
    (dict(ffn_keep="abc"), "--ffn-keep must be a channel count"),
    (dict(target_params=2.0), r"--target-params must be a fraction in \(0, 1\]"),
    (dict(vocab_order="freq"), "--vocab-order must be one of auto, id, frequency"),
    (dict(refit="yes"), "--refit must be one of"),
    (dict(ffn_criterion="act3"), "--ffn-criterion must be one of"),
])
def test_a_method_is_checked_when_it_is_made(fields, said):
    with pytest.raises(ValueError, match=said):
        compact.Method(**fields)


def test_careless_calls_are_one_line_errors(tmp_path):
    model = tiny_models.build("llama")
    with pytest.raises(ValueError, match="nothing to prune"):
        compact.prune(model)
    with pytest.raises(FileNotFoundError, match="calibration file not found"):
        compact.decide(model, None, tmp_path / "missing.txt", compact.Method(ffn_keep="24ch"))
    with pytest.raises(TypeError, match="calibration must be a file path or compact.CalibOptions"):
        compact.decide(model, None, 3, compact.Method(ffn_keep="24ch"))


def test_a_tokenizer_of_another_model_and_unloaded_weights_are_refused(tmp_path):
    """The API refuses what the CLI refuses: a tokenizer whose ids run past the embedding, and (one line, no
    internal names) a model whose weights are still on the meta device."""
    from tokenizers_fixtures import llama2_tokenizer

    model = tiny_models.build("llama")  # 97 embedding rows; Llama 2's tokenizer has 32,000 ids
    with pytest.raises(ValueError, match="not this model's tokenizer"):
        compact.decide(model, llama2_tokenizer(tmp_path), None, compact.Method(vocab_keep=50))
    empty = type(model)(model.config).to("meta")
    with pytest.raises(ValueError, match="is on the meta device"):
        compact.decide(empty, None, None, compact.Method(vocab_keep=50))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(a tiny Llama folder with a byte-level BPE tokenizer, the same model written as an f32 .gguf beside it)."""
    pytest.importorskip("gguf")
    from compact import export

    root = tmp_path_factory.mktemp("gguf")
    folder, _ = tiny_models.byte_level_llama(root)
    return folder, export.export(folder, "f32", root / "tiny.gguf")


def test_load_reads_a_gguf_ready_for_decide(tiny_gguf, tmp_path):
    """compact.load dequantizes a .gguf as `compact prune` does: the same logits as the folder it was written from
    (f32: the same weights), and decide takes it; transformers' own gguf_file= load keeps its quantizer, and
    decide's refusal points at compact.load."""
    from kernel_ops.tolerances import assert_close, decoder_rtol
    from transformers import AutoModelForCausalLM

    folder, path = tiny_gguf
    model, tokenizer = compact.load(path)
    reference, _ = compact.load(folder)
    ids = torch.tensor([tokenizer("Once upon a time there was a little dog.").input_ids])
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    rtol = decoder_rtol(reference.config, ids.shape[1])  # float32 products laid out differently, nothing more
    assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), what="logits of the loaded GGUF")
    (tmp_path / "calib.txt").write_text("Once upon a time there was a little dog who liked to run. " * 8)
    decision = compact.decide(model, tokenizer, tmp_path / "calib.txt", compact.Method(vocab_keep=300),
                              compact.Run(progress=False))
    assert decision.sizes.vocab_after < decision.sizes.vocab_before
    raw = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    with pytest.raises(ValueError, match=r"quantized \(gguf\).*compact\.load\(path\)"):
        compact.decide(raw, tokenizer, None, compact.Method(vocab_keep=300))


@pytest.mark.filterwarnings("ignore:no tokenizer")
@pytest.mark.parametrize("given", [0.5, "0.5", 0.25])
def test_a_vocab_keep_ratio_is_a_share_of_the_regular_tokens(given):
    """--vocab-keep takes a ratio as --ffn-keep does (a float is a ratio, an int a count): the decision's count is
    the ratio of the regular tokens, rounded, and the cut keeps exactly the tokens that count keeps."""
    from compact.vocab import Vocabulary

    model = tiny_models.build("llama")
    regular = len(Vocabulary.of(model, None).regular)
    ratio = compact.decide(model, None, None, compact.Method(vocab_keep=given), compact.Run(progress=False))
    count = compact.decide(model, None, None, compact.Method(vocab_keep=round(float(given) * regular)),
                           compact.Run(progress=False))
    assert ratio.vocab_keep == round(float(given) * regular) == count.vocab_keep
    assert ratio.kept_token_ids == count.kept_token_ids
