"""Layerwise calibration (`compact.layerwise.score_layerwise`) against the in-memory `score_channels`.

Every supported family as a tiny random model saved with save_pretrained (several shards, and one file),
padded batches, a kept-token set: the layerwise scores equal the in-memory ones (within the float32 bound of
the network's arithmetic, relative to the layer maximum; in practice bit-identical). Plus bf16, the Triton
kernels under the interpreter, a real checkpoint (stories260K), clear errors, and the peak memory of both
paths on a 16-layer model of ~270 MB (printed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf

from kernel_ops.tolerances import FP32_U, decoder_rtol, fp32_forward_rtol
import tiny_models
from memory_probe import PRELUDE
from tiny_models import CASES, HIDDEN, INTER, VOCAB
from compact import models
from compact.layerwise import Placement, score_layerwise
from compact.scoring import ScoringOptions, score_channels

SEQ, LAYERS = 12, 3
# The layerwise and the in-memory forward run the same ops on the same batches, but float32 BLAS results may
# still round differently (blocking, threads): bounded by the network's arithmetic (tests/kernel_ops/tolerances.py).
FWD_RTOL = fp32_forward_rtol(9 * LAYERS + 2, max(HIDDEN, INTER, SEQ))


def build(case: str, seed: int = 0) -> torch.nn.Module:
    return tiny_models.build(case, seed, LAYERS)


def save(model, folder, *, sharded: bool) -> str:
    model.save_pretrained(folder, max_shard_size="8KB" if sharded else "10GB")
    files = os.listdir(folder)
    assert ("model.safetensors.index.json" in files) == sharded, files
    if sharded:
        assert sum(f.endswith(".safetensors") for f in files) >= 3, f"expected several shards, got {files}"
    return str(folder)


def batch(seed: int = 1, rows: int = 5):
    """[rows, SEQ] ids with right padding in row 1 and left padding in row 3 (the last row when fewer)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    mask = torch.ones(rows, SEQ, dtype=torch.long)
    mask[1, SEQ - 4:] = 0
    mask[rows - 1 if rows < 4 else 3, :3] = 0
    return ids, mask


KEEP = sorted(set(range(0, VOCAB, 2)) | {1, 95})


def assert_scores_equal(got: dict, ref: dict, *, rtol: float, what: str) -> None:
    assert list(got) == list(ref), f"{what}: layers {list(got)} != {list(ref)}"
    for name, expected in ref.items():
        actual = got[name].detach().cpu()
        assert actual.dtype == torch.float64, f"{what} {name}: {actual.dtype}, not float64"
        scale = float(expected.abs().max())
        assert scale > 0, f"{what} {name}: all-zero reference"
        diff = float((actual - expected.cpu()).abs().max()) / scale
        assert diff <= rtol, f"{what} {name}: max |diff| / max |ref| = {diff:.3g} > {rtol:g}"


def in_memory(folder, ids, mask, *, dtype=torch.float32, device="cpu", **kwargs):
    model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return score_channels(model, ids, mask, progress=False, **kwargs)


# --------------------------------------------------------------------------------------------- equality

def test_every_family_is_covered():
    assert {CASES[c][0] for c in CASES} == set(models.FAMILIES)


@pytest.mark.parametrize("case", list(CASES))
def test_layerwise_equals_in_memory(case, tmp_path, compute):
    folder = save(build(case), tmp_path / case, sharded=True)
    ids, mask = (t.to(compute.device) for t in batch())
    ref = in_memory(folder, ids, mask, dtype=compute.torch_dtype, device=compute.device, keep_token_ids=KEEP,
                    batch_size=2)
    got = score_layerwise(folder, ids, mask, ScoringOptions(keep_token_ids=KEEP, batch_size=2, progress=False),
                          Placement(compute.device, compute.torch_dtype))
    assert_scores_equal(got, ref, rtol=FWD_RTOL * compute.u / FP32_U, what=f"{case} layerwise vs in-memory")


@pytest.mark.parametrize("case", ["qwen2", "gemma2"])
def test_single_file_token_weights_no_mask_hooks(case, tmp_path):
    """One model.safetensors, a float token-weight table, no attention mask,
    and the plain hook scoring path."""
    folder = save(build(case, seed=3), tmp_path / case, sharded=False)
    ids, _ = batch(seed=4, rows=3)
    weights = torch.rand(VOCAB, generator=torch.Generator().manual_seed(5))
    ref = in_memory(folder, ids, None, token_weights=weights, batch_size=3)
    got = score_layerwise(folder, ids, None, ScoringOptions(token_weights=weights, batch_size=3, path="hooks",
                                                            progress=False), Placement())
    assert_scores_equal(got, ref, rtol=FWD_RTOL, what=f"{case} single file, hooks")


@pytest.mark.parametrize("case", ["gemma3_text", "phi3"])
def test_bf16(case, tmp_path):
    """bf16 weights and compute (Gemma's embedding scale is rounded to bf16 as from_pretrained does)."""
    folder = save(build(case).to(torch.bfloat16), tmp_path / case, sharded=True)
    ids, mask = batch()
    ref = in_memory(folder, ids, mask, dtype=torch.bfloat16, keep_token_ids=KEEP, batch_size=2)
    got = score_layerwise(folder, ids, mask, ScoringOptions(keep_token_ids=KEEP, batch_size=2, progress=False),
                          Placement(dtype=torch.bfloat16))
    # bf16 rounding (2^-8) would make an arithmetic bound meaningless; the claim here is that both paths run
    # the same bf16 ops on the same batches, so only the float32 sum of the squares (rows * u) may differ.
    assert_scores_equal(got, ref, rtol=1e-6, what=f"{case} bf16")


@pytest.mark.parametrize("case", ["llama", "gemma", "phi3"])
def test_triton_kernels_under_interpreter(case, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("COMPACT_KERNELS_BACKEND", "triton")
    folder = save(build(case), tmp_path / case, sharded=True)
    ids, mask = batch(rows=3)
    ref = in_memory(folder, ids, mask, keep_token_ids=KEEP, batch_size=2)
    got = score_layerwise(folder, ids, mask, ScoringOptions(keep_token_ids=KEEP, batch_size=2, progress=False))
    assert_scores_equal(got, ref, rtol=FWD_RTOL, what=f"{case} triton interpreter")


def test_real_checkpoint_stories260k(shared_data, tmp_path):
    from compact.llama2c import load_llama2c

    folder = tmp_path / "stories"
    load_llama2c(shared_data / "stories260K.bin").save_pretrained(folder, max_shard_size="300KB")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (6, 64), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 40:] = 0
    keep = list(range(400))
    ref = in_memory(folder, ids, mask, keep_token_ids=keep, batch_size=4)
    got = score_layerwise(folder, ids, mask, ScoringOptions(keep_token_ids=keep, batch_size=4, progress=False))
    config = tf.AutoConfig.from_pretrained(folder)
    assert_scores_equal(got, ref, rtol=decoder_rtol(config, 64), what="stories260K")


# ------------------------------------------------------------------------------------------------ errors

def test_llama2c_file_is_refused(shared_data):
    ids, mask = batch()
    with pytest.raises(ValueError, match="llama2.c"):
        score_layerwise(shared_data / "stories260K.bin", ids, mask)


def test_errors(tmp_path):
    ids, mask = batch()
    with pytest.raises(models.UnsupportedModelError, match="supported: llama"):
        tf.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
        score_layerwise(tmp_path / "gpt2", ids, mask)
    with pytest.raises(ValueError, match=r"\[sequences, length\]"):
        score_layerwise(tmp_path, ids[0])
    model = build("llama")
    (tmp_path / "nosafe").mkdir()
    model.config.save_pretrained(tmp_path / "nosafe")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        score_layerwise(tmp_path / "nosafe", ids, mask)
    folder = save(model, tmp_path / "gap", sharded=True)
    index_path = tmp_path / "gap" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"1 missing \(model.layers.1.mlp.up_proj.weight\)"):
        score_layerwise(folder, ids, mask)


# ------------------------------------------------------------------------------------------------ memory

MEASURE = PRELUDE + textwrap.dedent("""
    folder, out = sys.argv[1], sys.argv[2]
    import transformers
    import transformers.models.llama.modeling_llama  # library code: imported before the baselines
    from compact.layerwise import score_layerwise
    from compact.scoring import ScoringOptions, score_channels
    transformers.AutoConfig.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 32), generator=gen)
    mask = torch.ones_like(ids); mask[1, 20:] = 0
    # Layerwise first: memory it leaves to the allocator could only make the in-memory figure smaller.
    base = start()
    layerwise = score_layerwise(folder, ids, mask, ScoringOptions(keep_token_ids=range(400), batch_size=2,
                                                                   progress=False))
    figures = {"layerwise": {"base": base, "peak": status()["VmHWM"]}}
    base = start()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    whole = score_channels(model, ids, mask, keep_token_ids=range(400), batch_size=2, progress=False)
    figures["in-memory"] = {"base": base, "peak": status()["VmHWM"]}
    torch.save({"layerwise": layerwise, "in-memory": whole}, out)
    print(json.dumps(figures))
""")


def measure(folder, tmp_path) -> tuple[dict, dict]:
    """Both paths in one fresh process, each from a reset high-water mark: ({mode: {base, peak}}, {mode: scores})."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(tmp_path / "scores.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), torch.load(tmp_path / "scores.pt")


@pytest.mark.slow  # peak RSS of its own fresh process: other tests beside it do not move it
def test_peak_memory_16_layers(tmp_path):
    """A 16-layer model of ~270 MB (fp32): layerwise peak RSS vs loading it whole. Prints the figures."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) to read the peak RSS")
    model = tiny_models.big_llama(intermediate=2048, vocab=512)
    config = model.config
    folder = tmp_path / "big"
    model.save_pretrained(folder, max_shard_size="100MB")
    total = sum(p.numel() * 4 for p in model.parameters())
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    del model
    figures, scores = measure(folder, tmp_path)
    layerwise, whole = figures["layerwise"], figures["in-memory"]
    assert_scores_equal(scores["layerwise"], scores["in-memory"], rtol=decoder_rtol(config, 32), what="16-layer model")
    mb = 1 / 2**20
    s_peak, w_peak = (layerwise["peak"] - layerwise["base"]) * mb, (whole["peak"] - whole["base"]) * mb
    print(f"\n16-layer Llama: weights {total * mb:.0f} MiB fp32, one layer {layer * mb:.1f} MiB; peak RSS above the "
          f"post-import baseline: layerwise {s_peak:.0f} MiB, in memory {w_peak:.0f} MiB "
          f"(ratio {s_peak / w_peak:.2f})")
    assert s_peak < 0.5 * w_peak, f"layerwise peak {s_peak:.0f} MiB is not under half of {w_peak:.0f} MiB"
