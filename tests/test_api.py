"""The Python API (compact.decide / apply / prune) on a model in memory: a frozen decision that changes nothing,
the cut it describes, and one-line errors for what a careless caller passes. (The Python examples of
README.md and docs/cli.md against `compact prune` on SmolLM2: tests/test_real_model.py.)"""
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
    with pytest.raises(TypeError, match="calibration must be a path .* or compact.CalibOptions"):
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


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before: dict, config: dict) -> bool:
    state = model.state_dict()
    return (state.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in state.items())
            and model.config.to_dict() == config)


@pytest.mark.parametrize("refit", ["sequential", "same-input", "none"])
def test_a_decision_for_another_model_is_refused_and_changes_nothing(calib, refit):
    """A decision applied to a model it was not made for (other FFN width, other vocabulary, the same shapes with
    other weights) raises before anything is written: the model keeps every tensor and its config."""
    decision = compact.decide(tiny_models.build("llama"), None, calib,
                              compact.Method(vocab_keep=40, ffn_keep="24ch", refit=refit), compact.Run(progress=False))
    assert bool(decision.refits) == (refit != "none")
    wider = tiny_models.config("llama")
    wider.intermediate_size, wider.vocab_size = 96, 120
    others = {"other shapes": type(tiny_models.build("llama"))(wider).eval(),
              "other weights": tiny_models.build("llama", seed=5)}
    for why, model in others.items():
        before, config = _state(model), model.config.to_dict()
        with pytest.raises(ValueError, match="decision was made for"):
            compact.apply(model, None, decision)
        assert _unchanged(model, before, config), why


def test_applying_a_decision_twice_says_so(calib):
    model = tiny_models.build("gemma")
    decision = compact.decide(model, None, calib, compact.Method(vocab_keep=40, ffn_keep="24ch"),
                              compact.Run(progress=False))
    compact.apply(model, None, decision)
    before, config = _state(model), model.config.to_dict()
    with pytest.raises(ValueError, match="already applied"):
        compact.apply(model, None, decision)
    assert _unchanged(model, before, config)


def test_a_cast_or_moved_model_is_the_same_model(calib):
    """The identity samples values at bfloat16 precision: the model decided on in float32, applied in bfloat16."""
    model = tiny_models.build("qwen2")
    decision = compact.decide(model, None, calib, compact.Method(ffn_keep="24ch"), compact.Run(progress=False))
    compact.apply(model.to(torch.bfloat16), None, decision)
    assert all(mlp.down_proj.in_features == 24 for mlp in (layer.mlp for layer in model.model.layers))


@pytest.mark.parametrize("damage", ["channel out of range", "re-fit of another shape", "tokenizer cut fails"])
def test_a_failing_apply_leaves_the_model_as_it_was(calib, damage, monkeypatch):
    """Whatever fails in `apply` (a decision's index past the model, a re-fit that does not fit, the tokenizer's
    cut) fails before the first re-fitted column or sliced tensor is written."""
    model = tiny_models.build("phi3")  # a fused gate_up_proj: rows of both halves are re-fitted
    decision = compact.decide(model, None, calib, compact.Method(vocab_keep=40, ffn_keep="24ch", refit="sequential"),
                              compact.Run(progress=False))
    last = list(decision.kept_channels)[-1]
    if damage == "channel out of range":
        decision = dataclasses.replace(decision, kept_channels={
            **decision.kept_channels, last: (*decision.kept_channels[last][:-1], 10_000)})
    elif damage == "re-fit of another shape":
        refit = decision.refits[last]
        decision = dataclasses.replace(decision, refits={**decision.refits, last: dataclasses.replace(
            refit, down=refit.down[:, :-1])})
    else:
        from compact import tokenizer as cut

        def fails(*_):
            raise RuntimeError("the tokenizer cannot be cut")
        monkeypatch.setattr(cut, "prune_tokenizer", fails)
        monkeypatch.setattr("compact.loading._check_fits", lambda *_: None)
    before, config = _state(model), model.config.to_dict()
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        compact.apply(model, object() if damage == "tokenizer cut fails" else None, decision)
    assert _unchanged(model, before, config)


def test_the_identity_samples_within_a_parameter_past_float32_integers():
    """An embedding of more than 2^24 values (SmolLM2's has 28.3M): the sampled indices stay inside it (a float32
    linspace would round the last one past the end)."""
    from compact import models

    config = tiny_models.config("llama", layers=1)
    config.vocab_size = 2**24 // config.hidden_size + 1
    model = type(tiny_models.build("llama", layers=1))(config)
    identity = models.Identity.of(model)
    assert identity.vocab == config.vocab_size and identity.values is not None
    with torch.no_grad():
        model.get_input_embeddings().weight[-1] += 1.0  # the last value is one of the 16 sampled
    assert models.Identity.of(model).values != identity.values


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
