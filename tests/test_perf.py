"""CPU-path benchmarks (pytest-benchmark) that double as correctness checks; they never fail on timing.

The project's addopts pass --benchmark-disable, so under plain `pytest` every benchmark body runs once and
only its checks count (a few seconds in all). For figures:

    pytest tests/test_perf.py --benchmark-enable            # a table per group: scoring, kernels, slicing
    pytest tests/test_perf.py --benchmark-enable --benchmark-columns=min,median,max,rounds

The end-to-end comparison on real model shapes is bench/calibration.py (see bench/README.md); its hook baseline,
tests/hook_baseline.py, is the reference here.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("pytest_benchmark")
pytestmark = pytest.mark.serial  # timings: alone on the machine

import compact_kernels as ck
from compact import models, slicing
from compact.scoring import ChannelScorer, run_scorer, score_channels
from hook_baseline import hook_scores
from kernel_ops.tolerances import decoder_rtol, fp32_sum_rtol

VOCAB, SAMPLES, SEQ, BATCH = 512, 4, 64, 2


def small_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False)


@pytest.fixture(scope="module")
def small():
    """(model, ids, mask, kept ids, keep table): a small float32 Llama and seeded calibration data."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(small_config()).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, SEQ - 9:] = 0  # one padded row: padding must not count
    kept = range(2 * VOCAB // 3)
    table = (torch.arange(VOCAB) < len(kept)).float()
    return model, ids, mask, kept, table


def assert_scores_close(got: dict, want: dict, what: str) -> None:
    """Within float32 rounding of two decoder passes (tests/kernel_ops/tolerances.py), relative to the layer maximum."""
    rtol = decoder_rtol(small_config(), SEQ)
    assert list(got) == list(want), f"{what}: layers {list(got)} != {list(want)}"
    for name in want:
        diff = float((got[name].double() - want[name].double()).abs().max() / want[name].double().abs().max())
        assert diff <= rtol, f"{what} {name}: max difference {diff:.3g} of the layer maximum > {rtol:g}"


def assert_untouched(model) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hooks left on {name or 'model'}"
        assert "forward" not in vars(module), f"instance forward left on {name}"


# ------------------------------------------------------------------------------------------------ scoring

@pytest.mark.benchmark(group="scoring")
def test_score_channels_cpu(benchmark, small):
    """The fast CPU path: decoder only, stops after the last MLP, same scores as the hook baseline."""
    model, ids, mask, kept, table = small
    decoder = models.decoder_of(model)
    ran = []
    watch = [decoder.norm.register_forward_hook(lambda *a: ran.append("final norm")),
             model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))]
    try:
        scores = benchmark(score_channels, model, ids, mask, keep_token_ids=kept, batch_size=BATCH, progress=False)
    finally:
        for handle in watch:
            handle.remove()
    assert not ran, f"score_channels ran {sorted(set(ran))}: it must stop after the last MLP"
    assert_untouched(model)
    want = hook_scores(model, ids, mask, table, BATCH)
    assert_scores_close(scores, want, "score_channels vs hooks on the full forward")
    again = score_channels(model, ids, mask, keep_token_ids=kept, batch_size=BATCH, progress=False)
    assert all(torch.equal(again[k], scores[k]) for k in scores), "score_channels is not deterministic"


@pytest.mark.benchmark(group="scoring")
def test_hooks_full_forward_baseline(benchmark, small):
    """The baseline users write (full forward, logits, hooks on down_proj): the figure to compare against."""
    model, ids, mask, kept, table = small
    scores = benchmark(hook_scores, model, ids, mask, table, BATCH)
    ref = score_channels(model, ids, mask, keep_token_ids=kept, batch_size=BATCH, path="hooks", progress=False)
    assert_scores_close(scores, ref, "bench baseline vs ChannelScorer(path='hooks')")
    assert_untouched(model)


@pytest.mark.benchmark(group="scoring")
def test_channel_scorer_user_loop_cpu(benchmark, small):
    """ChannelScorer in a user's own loop (full model forwards): buffers survive a switch of grad mode."""
    model, ids, mask, kept, _ = small
    want = score_channels(model, ids, mask, keep_token_ids=kept, batch_size=BATCH, progress=False)

    def loop():
        with ChannelScorer(model, keep_token_ids=kept) as scorer:
            for i, start in enumerate(range(0, SAMPLES, BATCH)):
                # inference_mode then no_grad: the reused buffers must not be inference tensors by then
                with torch.inference_mode() if i % 2 == 0 else torch.no_grad():
                    model(input_ids=ids[start:start + BATCH], attention_mask=mask[start:start + BATCH])
        return scorer.scores

    got = benchmark(loop)
    assert_scores_close(got, want, "ChannelScorer in a user loop vs score_channels")
    assert_untouched(model)


def test_interrupted_run_restores_model(small):
    model, ids, mask, kept, _ = small
    scorer = ChannelScorer(model, keep_token_ids=kept)

    def stop(module, args):
        raise KeyboardInterrupt

    hook = model.model.layers[1].register_forward_pre_hook(stop)  # a Ctrl-C in the middle of a forward
    with pytest.raises(KeyboardInterrupt):
        run_scorer(scorer, ids, mask, batch_size=BATCH)
    hook.remove()
    assert_untouched(model)
    with torch.no_grad():
        assert model(input_ids=ids[:1]).logits.shape == (1, SEQ, VOCAB)  # runs to the end again
    tokens = scorer.tokens
    with scorer, torch.no_grad():  # entered plainly again: its decoder pre-hook counts, nothing stops the forward
        assert model(input_ids=ids[:1]).logits.shape == (1, SEQ, VOCAB)
    assert scorer.tokens == tokens + float(scorer.weights_for(ids[:1], None).sum())


# ------------------------------------------------------------------------------------- ops (CPU reference)

TOKENS, CHANNELS = 2048, 1024


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_glu_and_score_cpu(benchmark, dtype):
    gen = torch.Generator().manual_seed(2)
    gate, up = torch.randn(2, TOKENS, CHANNELS, generator=gen).to(dtype).unbind(0)
    w = (torch.rand(TOKENS, generator=gen) < 0.7).float()

    def run():
        scores = torch.zeros(CHANNELS, dtype=torch.float64)
        return ck.glu_and_score(gate, up, weights=w, scores=scores), scores

    h, scores = benchmark(run)
    want_h = torch.nn.functional.silu(gate) * up
    assert torch.equal(h, want_h), "h is not act(gate) * up in the input dtype"
    want = (w.double()[:, None] * want_h.double().square()).sum(0)
    torch.testing.assert_close(scores, want, rtol=fp32_sum_rtol(TOKENS), atol=0)


@pytest.mark.benchmark(group="kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_scores_cpu(benchmark, dtype):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(TOKENS, CHANNELS, generator=gen).to(dtype)
    w = torch.rand(TOKENS, generator=gen)
    got = benchmark(ck.channel_scores, h, w)
    want = (w.double()[:, None] * h.double().square()).sum(0)
    torch.testing.assert_close(got.double(), want, rtol=fp32_sum_rtol(TOKENS), atol=0)
    assert torch.equal(ck.channel_scores(h, w), got), "channel_scores is not deterministic"


@pytest.mark.benchmark(group="kernels")
def test_gather_rows_cpu(benchmark):
    weight = torch.randn(8192, 256, generator=torch.Generator().manual_seed(4))
    index = torch.arange(0, 8192, 2)
    got = benchmark(ck.gather_rows, weight, index)
    assert torch.equal(got, weight[index])


@pytest.mark.benchmark(group="kernels")
def test_gather_cols_cpu(benchmark):
    weight = torch.randn(512, 4096, generator=torch.Generator().manual_seed(5))
    index = torch.randperm(4096, generator=torch.Generator().manual_seed(6))[:3072].sort().values
    got = benchmark(ck.gather_cols, weight, index)
    assert torch.equal(got, weight[:, index])


# ------------------------------------------------------------------------------------------------ slicing

@pytest.mark.benchmark(group="slicing")
def test_ffn_slice_cpu(benchmark, small):
    model = small[0]
    keep = {name: list(range(0, mlp.down_proj.in_features, 3)) for name, mlp in models.mlps(model).items()}

    def fresh():
        return (copy.deepcopy(model), keep), {}

    def run(m, k):
        slicing.slice_model(m, kept_channels=k)
        return m

    pruned = benchmark.pedantic(run, setup=fresh, rounds=5)
    for (name, old), new in zip(models.mlps(model).items(), models.mlps(pruned).values()):
        index = torch.tensor(keep[name])
        assert torch.equal(new.gate_proj.weight, old.gate_proj.weight[index]), name
        assert torch.equal(new.up_proj.weight, old.up_proj.weight[index]), name
        assert torch.equal(new.down_proj.weight, old.down_proj.weight[:, index]), name


@pytest.mark.benchmark(group="slicing")
def test_vocabulary_slice_cpu(benchmark, small):
    model = small[0]
    kept = list(range(0, VOCAB, 2))

    def fresh():
        return (copy.deepcopy(model), kept), {}

    def run(m, k):
        slicing.slice_model(m, kept_token_ids=k)
        return m

    pruned = benchmark.pedantic(run, setup=fresh, rounds=5)
    index = torch.tensor(kept)
    assert torch.equal(pruned.get_input_embeddings().weight, model.get_input_embeddings().weight[index])
    assert torch.equal(pruned.get_output_embeddings().weight, model.get_output_embeddings().weight[index])
    assert pruned.config.vocab_size == len(kept)
