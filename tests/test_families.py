"""Every supported model family, as a tiny random model built offline from its config.

For each family: fused scoring == hook scoring == an independent float64 reference; `ChannelScorer` in a
user's loop (no_grad and with autograd) restores the model exactly; FFN and vocabulary slicing are exact;
`compact.pruning.prune` end to end writes a checkpoint that reloads, holds exactly the kept rows/columns
and generates. An unsupported model type gives `UnsupportedModelError` naming the supported ones.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from compact import loading, models, output, pruning, slicing
from compact.options import CalibOptions
from compact.options import Method, Run
from compact.scoring import ChannelScorer, score_channels
import tiny_models
from kernel_ops.tolerances import assert_close, fp32_forward_rtol
from tiny_models import CASES, HIDDEN, INTER, VOCAB

LAYERS, SEQ = 2, 10
# Two float32 forwards of these models (or one against float64 arithmetic) round differently with the BLAS
# blocking, thread count and batch shape; their difference is bounded by the float32 arithmetic of the
# network's chain of reductions (tests/kernel_ops/tolerances.py): 9 per layer + final norm and head, each of at
# most max(HIDDEN, INTER, SEQ) terms. About 2.3e-4, well below what a wrong weight, mask, channel or row
# changes (> 1e-2; each test checks that its change is at least 10x this).
FWD_RTOL = fp32_forward_rtol(9 * LAYERS + 2, max(HIDDEN, INTER, SEQ))
SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]
cases = pytest.mark.parametrize("case", list(CASES))
# The tiny models have no tokenizer; the pipeline says so when it writes the checkpoint.
pytestmark = pytest.mark.filterwarnings("ignore:the model has no tokenizer:UserWarning")


# ----------------------------------------------------------------------------------------------- helpers

def build(case: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_models.build(case, seed, LAYERS)
    assert models.is_tied(model) == bool(model.config.tie_word_embeddings), f"{case}: tying is not as configured"
    return model


def special_ids(config) -> list[int]:
    ids = []
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, attr, None)
        ids += value if isinstance(value, list) else [] if value is None else [value]
    return ids


def padded_batch(seed: int, rows: int = 2, pad_row: int = 1, pad: int = 3, ids_from=None):
    """[rows, SEQ] ids and a mask with `pad` zeros at the end of row `pad_row` (right padding)."""
    gen = torch.Generator().manual_seed(seed)
    if ids_from is None:
        ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    else:
        pool = torch.as_tensor(ids_from)
        ids = pool[torch.randint(0, len(pool), (rows, SEQ), generator=gen)]
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    mask[pad_row, SEQ - pad:] = 0
    return ids, mask


def kept_tokens(config, seed: int = 0, count: int = 60) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    ids = set(torch.randperm(VOCAB, generator=gen)[:count].tolist()) | set(special_ids(config))
    return sorted(ids)


def layers_of(model):
    """The decoder layers, found without compact.models (so the reference is independent of it)."""
    return model.model.layers


def reference_scores(model, batches, kept) -> dict[str, torch.Tensor]:
    """Common act^2 from forward pre-hooks on every down_proj during FULL model forwards, in float64."""
    scores = {f"model.layers.{i}.mlp": torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64)
              for i, layer in enumerate(layers_of(model))}
    state = {}

    def hook_for(name):
        def hook(module, args):
            h = args[0].detach().double()
            scores[name] += (state["w"][..., None] * h.square()).sum(dim=(0, 1))
        return hook

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook_for(f"model.layers.{i}.mlp"))
               for i, layer in enumerate(layers_of(model))]
    try:
        with torch.no_grad():
            for ids, mask in batches:
                state["w"] = torch.isin(ids, torch.as_tensor(kept)).double() * mask.double()
                model(input_ids=ids, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def assert_scores_close(actual: dict, expected: dict, *, what: str, rtol: float = FWD_RTOL) -> None:
    """Per layer, within rtol of each score and of the layer's largest score (the scale of its terms)."""
    assert list(actual) == list(expected), f"{what}: layer names {list(actual)} != {list(expected)}"
    for name, ref in expected.items():
        assert actual[name].dtype == torch.float64, f"{what} {name}: scores are {actual[name].dtype}, not float64"
        assert_close(actual[name], ref, rtol=rtol, atol=rtol * float(ref.abs().max()), what=f"{what} {name}")


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, *, what: str, rtol: float = FWD_RTOL) -> None:
    assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()), what=what)


def assert_changed(before: torch.Tensor, after: torch.Tensor, what: str) -> None:
    """The change under test is at least 10x the comparison tolerance, so the test can fail."""
    change = float((after - before).abs().max()) / float(before.abs().max())
    assert change > 10 * FWD_RTOL, f"{what}: changed by {change:.2g} of the scale only (test too weak)"


def logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_restored(model, batches, before, what: str) -> None:
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                     "_forward_pre_hooks_with_kwargs"):
            left = getattr(module, attr, {})
            assert not left, f"{what}: {attr} left on {name or type(module).__name__}: {dict(left)}"
    for i, layer in enumerate(layers_of(model)):
        assert "forward" not in vars(layer.mlp), f"{what}: layer {i} MLP keeps an instance-level forward"
    for (ids, mask), old in zip(batches, before):
        assert torch.equal(logits(model, ids, mask), old), f"{what}: logits changed after the scorer exited"


# ---------------------------------------------------------------------------------------------- coverage

def test_every_supported_family_is_covered():
    assert list(models.FAMILIES) == SUPPORTED, "the family table changed: add a case here for every new family"
    assert {CASES[c][0] for c in CASES} == set(SUPPORTED)


# ------------------------------------------------------------------------------------------------ scoring

# The fused path through the Triton kernels (interpreter on CPU) for one family per activation/layout:
# silu, gelu_tanh, and Phi-3's fused gate_up_proj.
@pytest.mark.parametrize("case,kernels", [(c, "torch") for c in CASES] +
                         [(c, "triton-interpreter") for c in ("llama", "gemma", "phi3")])
def test_score_channels_fused_equals_hooks_and_reference(case, kernels, monkeypatch):
    if kernels == "triton-interpreter":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("COMPACT_KERNELS_BACKEND", "triton")
    model = build(case)
    kept = kept_tokens(model.config)
    ids, mask = padded_batch(seed=1)
    fused = score_channels(model, ids, mask, keep_token_ids=kept, path="fused", progress=False)
    hooks = score_channels(model, ids, mask, keep_token_ids=kept, path="hooks", progress=False)
    ref = reference_scores(model, [(ids, mask)], kept)
    # The reference is a full model forward (LM head included) squared in float64; the decoder-only passes
    # round differently (another batch layout; the Triton activation differs by an ulp), within FWD_RTOL.
    assert_scores_close(hooks, ref, what=f"{case}: hooks vs float64 reference")
    assert_scores_close(fused, hooks, what=f"{case} ({kernels}): fused vs hooks")
    assert_scores_close(fused, ref, what=f"{case} ({kernels}): fused vs float64 reference")
    # The weighting matters: padding and dropped tokens must not count.
    unweighted = reference_scores(model, [(ids, torch.ones_like(mask))], list(range(VOCAB)))
    name = "model.layers.0.mlp"
    assert_changed(ref[name], unweighted[name], f"{case}: dropping the weights")


def test_backend_is_a_deprecated_alias_of_path():
    """backend= (the old name of the scoring path) still works, with a DeprecationWarning naming path=."""
    model = build("llama")
    ids, mask = padded_batch(seed=1)
    want = score_channels(model, ids, mask, path="hooks", progress=False)
    with pytest.warns(DeprecationWarning, match="path="):
        got = score_channels(model, ids, mask, backend="hooks", progress=False)
    assert all(torch.equal(got[name], want[name]) for name in want)
    with pytest.warns(DeprecationWarning, match="path="):
        assert ChannelScorer(model, backend="auto").path == "fused"
    with pytest.raises(TypeError, match="not both"):
        ChannelScorer(model, path="hooks", backend="hooks")
    with pytest.raises(TypeError, match="not both"):
        score_channels(model, ids, path="fused", backend="hooks")
    with pytest.raises(ValueError, match="path .* must be one of auto, fused, hooks"):
        ChannelScorer(model, path="triton")


@cases
@pytest.mark.parametrize("path", ["fused", "hooks"])
def test_channel_scorer_in_user_loop_restores_model(case, path):
    model = build(case)
    kept = kept_tokens(model.config, seed=2)
    batches = [padded_batch(seed=3, pad_row=1), padded_batch(seed=4, pad_row=0, pad=5)]
    before = [logits(model, ids, mask) for ids, mask in batches]
    all_ids = torch.cat([b[0] for b in batches])
    all_mask = torch.cat([b[1] for b in batches])
    expected = score_channels(model, all_ids, all_mask, keep_token_ids=kept, batch_size=2, path=path,
                              progress=False)
    assert_scores_close(expected, reference_scores(model, batches, kept),
                        what=f"{case}: score_channels over both batches vs float64 reference")

    with ChannelScorer(model, keep_token_ids=kept, path=path) as s, torch.no_grad():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask)
    assert_scores_close(s.scores, expected, what=f"{case} ChannelScorer({path}) under no_grad")
    assert_restored(model, batches, before, f"{case} ChannelScorer({path}) under no_grad")

    # With autograd on: same scores, and the gradients are those of the plain model.
    def run_backward(scorer=None):
        model.zero_grad(set_to_none=True)
        for ids, mask in batches:
            out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
            out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = run_backward()
    with ChannelScorer(model, keep_token_ids=kept, path=path) as s:
        scored = run_backward()
    assert_scores_close(s.scores, expected, what=f"{case} ChannelScorer({path}) with grad enabled")
    assert set(scored) == set(plain), f"{case}: parameters with a gradient differ under the scorer"
    gate = "model.layers.0.mlp." + ("gate_up_proj" if case == "phi3" else "gate_proj") + ".weight"
    assert gate in scored and scored[gate].abs().sum() > 0, f"{case}: no gradient reached {gate}"
    for n in plain:
        # The backward pass runs the chain again in reverse: twice the forward's depth.
        assert_logits_close(scored[n], plain[n], rtol=2 * FWD_RTOL, what=f"{case} ChannelScorer({path}) grad of {n}")
    model.zero_grad(set_to_none=True)
    assert_restored(model, batches, before, f"{case} ChannelScorer({path}) with grad enabled")

    # An exception inside the block still restores the model.
    with pytest.raises(RuntimeError, match="user error"):
        with ChannelScorer(model, keep_token_ids=kept, path=path), torch.no_grad():
            model(input_ids=batches[0][0], attention_mask=batches[0][1])
            raise RuntimeError("user error")
    assert_restored(model, batches, before, f"{case} ChannelScorer({path}) after an exception")


# ------------------------------------------------------------------------------------------------ slicing

@cases
def test_ffn_slice_is_exact(case):
    model = build(case)
    keep = 20
    gen = torch.Generator().manual_seed(5)
    kept = {f"model.layers.{i}.mlp": sorted(torch.randperm(INTER, generator=gen)[:keep].tolist())
            for i in range(LAYERS)}
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(layers_of(masked)):
            dropped = sorted(set(range(INTER)) - set(kept[f"model.layers.{i}.mlp"]))
            layer.mlp.down_proj.weight[:, dropped] = 0
    pruned = copy.deepcopy(model)
    slicing.slice_model(pruned, kept_channels=kept)

    ids, mask = padded_batch(seed=6)
    full, want, got = logits(model, ids, mask), logits(masked, ids, mask), logits(pruned, ids, mask)
    assert_changed(full, want, f"{case}: dropping channels")
    assert_logits_close(got, want, what=f"{case}: FFN-pruned logits vs zeroed-channel logits")

    assert pruned.config.intermediate_size == keep, f"{case}: config.intermediate_size not updated"
    for i, (old, new) in enumerate(zip(layers_of(model), layers_of(pruned))):
        index = torch.tensor(kept[f"model.layers.{i}.mlp"])
        where = f"{case} layer {i}"
        if case == "phi3":
            fused = torch.cat([index, index + INTER])
            assert torch.equal(new.mlp.gate_up_proj.weight, old.mlp.gate_up_proj.weight[fused]), f"{where}: gate_up_proj"
            assert new.mlp.gate_up_proj.out_features == 2 * keep
        else:
            for proj in ("gate_proj", "up_proj"):
                assert torch.equal(getattr(new.mlp, proj).weight, getattr(old.mlp, proj).weight[index]), f"{where}: {proj}"
                assert getattr(new.mlp, proj).out_features == keep
        assert torch.equal(new.mlp.down_proj.weight, old.mlp.down_proj.weight[:, index]), f"{where}: down_proj"
        assert new.mlp.down_proj.in_features == keep
        if hasattr(new.mlp, "intermediate_size"):
            assert new.mlp.intermediate_size == keep, f"{where}: mlp.intermediate_size not updated"


@cases
def test_vocabulary_slice_is_exact(case):
    model = build(case)
    config = model.config
    kept = kept_tokens(config, seed=7, count=50)
    assert kept == sorted(kept) and set(special_ids(config)) <= set(kept)
    new_id = {old: new for new, old in enumerate(kept)}
    old_embedding = model.get_input_embeddings()
    old_head = model.get_output_embeddings().weight.detach().clone()
    pruned = copy.deepcopy(model)
    slicing.slice_model(pruned, kept_token_ids=kept)

    ids, mask = padded_batch(seed=8, ids_from=kept)
    new_ids = torch.tensor([[new_id[int(t)] for t in row] for row in ids])
    want = logits(model, ids, mask)[..., kept]
    got = logits(pruned, new_ids, mask)
    assert got.shape[-1] == len(kept), f"{case}: pruned logits have {got.shape[-1]} columns, kept {len(kept)} ids"
    assert_logits_close(got, want, what=f"{case}: vocabulary-pruned logits vs kept columns")

    embedding, head = pruned.get_input_embeddings(), pruned.get_output_embeddings()
    index = torch.tensor(kept)
    assert torch.equal(embedding.weight, old_embedding.weight[index]), f"{case}: embedding rows are not the kept rows"
    assert embedding.num_embeddings == len(kept) and head.out_features == len(kept)
    if config.tie_word_embeddings:
        assert head.weight is embedding.weight, f"{case}: the LM head is no longer tied to the embedding"
    else:
        assert head.weight is not embedding.weight
        assert torch.equal(head.weight, old_head[index]), f"{case}: LM-head rows are not the kept rows"
    assert pruned.config.vocab_size == len(kept)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        old = getattr(config, attr)
        want_id = None if old is None else [new_id[v] for v in old] if isinstance(old, list) else new_id[old]
        assert getattr(pruned.config, attr) == want_id, f"{case}: config.{attr} {getattr(pruned.config, attr)} != {want_id}"
        if getattr(model.generation_config, attr, None) is not None:
            assert getattr(pruned.generation_config, attr) == want_id, f"{case}: generation_config.{attr} not renumbered"
    if old_embedding.padding_idx is not None:
        assert embedding.padding_idx == new_id[old_embedding.padding_idx], f"{case}: padding_idx not renumbered"
    if case.startswith("gemma"):
        assert type(embedding) is type(old_embedding), f"{case}: scaled embedding replaced by {type(embedding)}"
        scale = float(embedding.embed_scale)
        assert scale == pytest.approx(math.sqrt(HIDDEN)), f"{case}: embed_scale {scale}"
        with torch.no_grad():
            assert torch.equal(embedding(new_ids), embedding.weight[new_ids] * embedding.embed_scale.to(torch.float32))


# ------------------------------------------------------------------------------------------- end to end

@cases
def test_prune_end_to_end(case, tmp_path):
    model = build(case)
    src, out = tmp_path / "model", tmp_path / "pruned"
    model.save_pretrained(src)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = np.random.default_rng(9).integers(0, VOCAB, size=(4, 12), dtype=np.int64)
    np.save(tmp_path / "calib.npy", calib)

    loaded = loading.load(str(src), dtype="float32", device="cpu")
    assert loaded.tokenizer is None
    keep_vocab, keep_ffn = 60, 24
    method = Method(vocab_keep=keep_vocab, ffn_keep=str(keep_ffn), vocab_order="id",
                    refit="none")  # exact slices (test_engine: re-fits)
    calib_opts = CalibOptions(path=str(tmp_path / "calib.npy"), samples=4, seq_len=12)
    pruning.prune(loaded, out, method, calib_opts, Run(batch_size=2, check=True, progress=False))

    report = json.loads((out / "compact_report.json").read_text())
    kept_ids, kept_channels = report["kept_token_ids"], report["kept_channels"]
    assert kept_ids == sorted(set(range(keep_vocab)) | set(special_ids(model.config))), f"{case}: kept_token_ids"
    assert len(kept_channels) == LAYERS and all(len(c) == keep_ffn for c in kept_channels)
    check = report["checks"]["scores_vs_hooks"]
    assert check and check["ok"], f"{case}: --check result {check}"

    # The scores file is the common act^2 over the calibration rows with the kept vocabulary, and the kept
    # channels are its top-K per layer (ties to the lower index).
    scores = load_file(str(out / "compact_scores.safetensors"))
    ref = reference_scores(model, [(torch.from_numpy(calib), torch.ones(calib.shape, dtype=torch.long))], kept_ids)
    assert_scores_close({k: scores[k] for k in ref}, ref, what=f"{case}: compact_scores.safetensors")
    for i, chosen in enumerate(kept_channels):
        s = scores[f"model.layers.{i}.mlp"].double().tolist()
        top = sorted(sorted(range(INTER), key=lambda c: (-s[c], c))[:keep_ffn])
        assert chosen == top, f"{case} layer {i}: kept channels {chosen} are not the top-{keep_ffn} {top}"

    pruned = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(pruned) is type(model)
    assert pruned.config.vocab_size == len(kept_ids) and pruned.config.intermediate_size == keep_ffn
    tok, weights = torch.tensor(kept_ids), pruned.state_dict()
    tied = model.config.tie_word_embeddings
    if tied:
        assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight, f"{case}: head untied on reload"
    for name, old in original.items():
        if tied and name == "lm_head.weight":
            continue
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        ch = torch.tensor(kept_channels[int(layer)]) if layer is not None else None
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            want = old[tok]
        elif name.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")):
            want = old[ch]
        elif name.endswith("mlp.gate_up_proj.weight"):
            want = old[torch.cat([ch, ch + INTER])]
        elif name.endswith("mlp.down_proj.weight"):
            want = old[:, ch]
        else:
            want = old
        assert name in weights, f"{case}: {name} missing from the pruned checkpoint"
        assert torch.equal(weights[name], want), f"{case}: {name} of the pruned checkpoint is not the kept slice"

    # The reloaded model computes the original model's logits with dropped channels zeroed, on kept columns.
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(layers_of(masked)):
            dropped = sorted(set(range(INTER)) - set(kept_channels[i]))
            layer.mlp.down_proj.weight[:, dropped] = 0
    ids, mask = padded_batch(seed=10, ids_from=kept_ids)
    new_id = {old: new for new, old in enumerate(kept_ids)}
    new_ids = torch.tensor([[new_id[int(t)] for t in row] for row in ids])
    assert_logits_close(logits(pruned, new_ids, mask), logits(masked, ids, mask)[..., kept_ids],
                        what=f"{case}: reloaded pruned logits vs original with dropped channels zeroed")

    bos = pruned.config.bos_token_id
    prompt = torch.tensor([[bos, 5, 7]])
    generated = pruned.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                                pad_token_id=pruned.config.pad_token_id if pruned.config.pad_token_id is not None else bos)
    assert generated.shape[0] == 1 and 4 <= generated.shape[1] <= 7, f"{case}: generated shape {tuple(generated.shape)}"
    assert torch.equal(generated[:, :3], prompt)
    assert int(generated.max()) < len(kept_ids), f"{case}: generated an id outside the pruned vocabulary"


@pytest.mark.parametrize("case", ["llama-tied", "phi3"])
def test_prune_from_scores_file_breaks_ties_to_lower_index(case, tmp_path):
    """A given scores file with many equal values: the kept channels are its top-K, ties to the lower index."""
    model = build(case)
    src, out = tmp_path / "model", tmp_path / "pruned"
    model.save_pretrained(src)
    gen = torch.Generator().manual_seed(11)
    scores = {f"model.layers.{i}.mlp": torch.randint(0, 3, (INTER,), generator=gen).double() for i in range(LAYERS)}
    output.save_scores(scores, tmp_path / "scores.safetensors")
    keep = 16
    method = Method(ffn_keep=str(keep), scores=str(tmp_path / "scores.safetensors"))
    report = pruning.prune(loading.load(str(src), dtype="float32", device="cpu"), out, method, CalibOptions(),
                            Run(progress=False))
    saved = load_file(str(out / "compact_scores.safetensors"))
    for i, chosen in enumerate(report["kept_channels"]):
        s = saved[f"model.layers.{i}.mlp"].tolist()
        assert s == scores[f"model.layers.{i}.mlp"].tolist(), f"{case} layer {i}: scores file not copied as given"
        top = sorted(sorted(range(INTER), key=lambda c: (-s[c], c))[:keep])
        assert chosen == top, f"{case} layer {i}: kept {chosen}, the top-{keep} with ties to lower index is {top}"
    assert report["kept_token_ids"] == list(range(VOCAB))
    pruned = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert pruned.config.intermediate_size == keep and pruned.config.vocab_size == VOCAB
    ids, mask = padded_batch(seed=12)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(layers_of(masked)):
            layer.mlp.down_proj.weight[:, sorted(set(range(INTER)) - set(report["kept_channels"][i]))] = 0
    assert_logits_close(logits(pruned, ids, mask), logits(masked, ids, mask),
                        what=f"{case}: FFN-pruned checkpoint vs zeroed-channel logits")


# ------------------------------------------------------------------------------------------- unsupported

def test_unsupported_model_type(tmp_path):
    config = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, n_positions=64)
    model = tf.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, VOCAB, (1, 8))

    def check(excinfo, what):
        message = str(excinfo.value)
        assert "gpt2" in message, f"{what}: the message does not name the model type: {message}"
        missing = [t for t in SUPPORTED if t not in message]
        assert not missing, f"{what}: the message does not list {missing}: {message}"

    with pytest.raises(models.UnsupportedModelError) as e:
        models.family_of(config)
    check(e, "family_of")
    with pytest.raises(models.UnsupportedModelError) as e:
        score_channels(model, ids)
    check(e, "score_channels")
    with pytest.raises(models.UnsupportedModelError) as e:
        ChannelScorer(model)
    check(e, "ChannelScorer")
    with pytest.raises(models.UnsupportedModelError) as e:
        slicing.slice_model(model, kept_channels={})
    check(e, "slice_model")
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(models.UnsupportedModelError) as e:
        loading.load(str(tmp_path / "gpt2"), dtype="float32", device="cpu")
    check(e, "loading.load")
    assert issubclass(models.UnsupportedModelError, ValueError)
