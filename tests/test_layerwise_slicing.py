"""Layerwise slicing (`compact.layerwise_slicing.write_layerwise`) against the in-memory path.

For every supported family (Llama tied and untied included), from one file and from several shards: the
checkpoint written tensor by tensor equals `compact.slicing.slice_model` on the loaded model followed by
`save_pretrained` — same tensor names, dtypes and bytes, same config.json and generation_config.json — and
its summary's parameter counts equal `compact.models.parameter_counts` before and after. Also: bf16, vocabulary
only / FFN only, the atomic and guarded output of `compact prune --offload layerwise`, bad input, and a
peak-memory check (about two tensors).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file

import tiny_models
from memory_probe import PRELUDE
from tiny_models import CASES, INTER, VOCAB
from compact import cli, models, slicing
from compact.pruning import cut
from compact.layerwise_slicing import write_layerwise


def build(case: str, seed: int = 0, dtype=torch.float32):
    return tiny_models.build(case, seed).to(dtype)


def source(case: str, folder: Path, *, sharded: bool, dtype=torch.float32) -> Path:
    build(case, dtype=dtype).save_pretrained(folder, max_shard_size="8KB" if sharded else "10GB")
    assert (folder / "model.safetensors.index.json").is_file() == sharded
    return folder


def kept_ids(config, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    specials = set()
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, attr, None)
        specials |= set(value) if isinstance(value, list) else {value} if isinstance(value, int) else set()
    return sorted(set(torch.randperm(VOCAB, generator=gen)[:50].tolist()) | specials)


def kept_channels(model, keep: int = 20, seed: int = 0) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {name: sorted(torch.randperm(INTER, generator=gen)[:keep].tolist()) for name in models.mlps(model)}


def in_memory(src: Path, out: Path, ids, channels, dtype) -> tuple[dict, dict]:
    """The in-memory path: load, slice_model, save_pretrained; (counts before, after)."""
    model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    before = models.parameter_counts(model)
    slicing.slice_model(model, ids, channels)
    model.save_pretrained(out)
    return before, models.parameter_counts(model)


def layerwise(src: Path, out: Path, ids, channels) -> dict:
    """The layerwise path into a new folder `out`; the summary."""
    out.mkdir()
    return write_layerwise(src, out, ids, channels)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(out), f"{f.name} repeats tensors"
        out.update(part)
    return out


def assert_same_checkpoint(got: Path, ref: Path, what: str) -> None:
    a, b = tensors(ref), tensors(got)
    assert sorted(a) == sorted(b), f"{what}: tensor names differ: {sorted(set(a) ^ set(b))}"
    for name, expected in a.items():
        actual = b[name]
        assert actual.dtype == expected.dtype, f"{what} {name}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{what} {name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert torch.equal(actual, expected), f"{what} {name}: values differ"
    for name in ("config.json", "generation_config.json"):
        ja, jb = json.loads((ref / name).read_text()), json.loads((got / name).read_text())
        diff = {k: (ja.get(k), jb.get(k)) for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)}
        assert not diff, f"{what} {name}: (in-memory, layerwise) differ: {diff}"


# ------------------------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "one-file"])
@pytest.mark.parametrize("case", list(CASES))
def test_layerwise_equals_in_memory(case, sharded, tmp_path):
    src = source(case, tmp_path / "src", sharded=sharded)
    model = build(case)
    ids, channels = kept_ids(model.config), kept_channels(model)
    before, after = in_memory(src, tmp_path / "ref", ids, channels, torch.float32)
    summary = layerwise(src, tmp_path / "out", ids, channels)
    out = tmp_path / "out"
    assert_same_checkpoint(out, tmp_path / "ref", case)
    assert summary["parameters"] == {"before": before, "after": after}
    assert summary["sizes"] == {"vocab_before": VOCAB, "vocab_after": len(ids), "intermediate_before": INTER,
                                "intermediate_after": 20, "layers": 2, "hidden": 32}
    assert summary["tied"] == models.is_tied(model)
    src_files = sorted(p.name for p in src.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == src_files == summary["shards"]
    index = out / "model.safetensors.index.json"
    assert index.is_file() == sharded
    if sharded:
        data = json.loads(index.read_text())
        owners = {}
        for f in src_files:
            with safe_open(str(out / f), "pt") as h:
                owners.update({k: f for k in h.keys()})
        assert data["weight_map"] == owners
        assert data["metadata"]["total_size"] == summary["bytes"]["after"] == \
            sum(t.numel() * t.element_size() for t in tensors(out).values())
        assert data["metadata"]["total_parameters"] == after["total"]
    # loads in plain transformers and computes what the in-memory pruned model computes
    x = torch.tensor([[0, 3, 7, 11, 20, 33]]) % len(ids)
    with torch.no_grad():
        got = tf.AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=x).logits
        ref = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ref").eval()(input_ids=x).logits
    assert torch.equal(got, ref)


@pytest.mark.parametrize("case", ["llama", "gemma3_text", "phi3"])
def test_bf16_source_kept_in_bf16(case, tmp_path):
    src = source(case, tmp_path / "src", sharded=True, dtype=torch.bfloat16)
    model = build(case)
    ids, channels = kept_ids(model.config, 1), kept_channels(model, 16, 1)
    in_memory(src, tmp_path / "ref", ids, channels, torch.bfloat16)
    layerwise(src, tmp_path / "out", ids, channels)
    assert_same_checkpoint(tmp_path / "out", tmp_path / "ref", f"{case} bf16")
    assert all(t.dtype == torch.bfloat16 for t in tensors(tmp_path / "out").values())


@pytest.mark.parametrize("part", ["vocabulary", "ffn"])
def test_one_axis_only(part, tmp_path):
    src = source("qwen2", tmp_path / "src", sharded=True)
    model = build("qwen2")
    ids = kept_ids(model.config) if part == "vocabulary" else None
    channels = kept_channels(model) if part == "ffn" else None
    before, after = in_memory(src, tmp_path / "ref", ids, channels, torch.float32)
    summary = layerwise(src, tmp_path / "out", ids, channels)
    assert_same_checkpoint(tmp_path / "out", tmp_path / "ref", part)
    assert summary["parameters"] == {"before": before, "after": after}
    sizes = summary["sizes"]
    assert (sizes["vocab_after"] == VOCAB) == (part == "ffn")
    assert (sizes["intermediate_after"] == INTER) == (part == "vocabulary")


def test_unreadable_generation_config_is_derived_as_in_memory(tmp_path):
    """A damaged generation_config.json: like from_pretrained, the pruned checkpoint gets one derived from
    config.json (the same renumbered token ids as the in-memory prune writes), and the layerwise prune says so.
    (transformers' own fallback differs in a few unrelated defaults, e.g. output_attentions None vs False.)"""
    src = source("llama", tmp_path / "src", sharded=False)
    (src / "generation_config.json").write_text("{broken")
    model = build("llama")
    ids, channels = kept_ids(model.config), kept_channels(model)
    in_memory(src, tmp_path / "ref", ids, channels, torch.float32)
    with pytest.warns(UserWarning, match="generation_config.json cannot be read"):
        layerwise(src, tmp_path / "out", ids, channels)
    got, want = (json.loads((tmp_path / d / "generation_config.json").read_text()) for d in ("out", "ref"))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert got.get(attr) == want.get(attr), f"{attr}: layerwise {got.get(attr)}, in memory {want.get(attr)}"
    assert got.get("bos_token_id") == ids.index(1), "the token ids were not renumbered"


# ---------------------------------------------------------------------------------------- atomic output

def test_offloaded_prune_is_atomic_and_guarded(tmp_path, monkeypatch, capsys):
    """`compact prune --offload layerwise` writes the shards with `write_layerwise` into the pipeline's staging
    folder: a failure after them leaves nothing; tokenizer and report join them before the rename; an existing
    output is replaced only with --overwrite, and one inside the source is refused."""
    src = source("llama", tmp_path / "src", sharded=True)
    np.save(tmp_path / "calib.npy", np.arange(64).reshape(2, 32) % VOCAB)
    out = tmp_path / "out"

    def prune(*extra, to=out) -> int:
        return cli.main(["prune", str(src), "--out", str(to), "--offload", "layerwise", "--calib",
                         str(tmp_path / "calib.npy"), "--seq-len", "32", "--vocab-keep", "80", "--quiet", *extra])

    def failing(loaded, kept_ids, folder):
        assert (folder / "config.json").is_file() and (folder / "model.safetensors.index.json").is_file()
        assert folder.parent == tmp_path and folder != out
        raise OSError("tokenizer surgery failed")

    with monkeypatch.context() as patch:
        patch.setattr(cut, "save_tokenizer", failing)
        assert prune("--ffn-keep", "20ch") == 2 and "tokenizer surgery failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "src"], "a failed prune left files behind"
    assert prune("--ffn-keep", "20ch") == 0
    assert (out / "compact_report.json").is_file()
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 20
    capsys.readouterr()
    assert prune("--ffn-keep", "20ch") == 2 and "not empty" in capsys.readouterr().err
    assert prune(to=src / "inside") == 2 and "overlaps the source" in capsys.readouterr().err
    assert prune("--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == INTER
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "out", "src"]


def test_bad_input(tmp_path):
    src = source("llama", tmp_path / "src", sharded=False)
    model = build("llama")
    ids, channels = kept_ids(model.config), kept_channels(model)
    (tmp_path / "w").mkdir()
    with pytest.raises(ValueError, match="ascending"):
        write_layerwise(src, tmp_path / "w", ids[::-1], None)
    with pytest.raises(IndexError, match="outside"):
        write_layerwise(src, tmp_path / "w", ids + [VOCAB], None)
    with pytest.raises(ValueError, match="same number of channels"):
        write_layerwise(src, tmp_path / "w", None,
                        {**channels, "model.layers.1.mlp": channels["model.layers.1.mlp"][:5]})
    with pytest.raises(KeyError, match="every MLP"):
        write_layerwise(src, tmp_path / "w", None, {"model.layers.0.mlp": channels["model.layers.0.mlp"]})
    with pytest.raises(IndexError, match="outside"):
        write_layerwise(src, tmp_path / "w", None, {n: c[:-1] + [INTER] for n, c in channels.items()})
    with pytest.raises(models.UnsupportedModelError):
        tf.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
        write_layerwise(tmp_path / "gpt2", tmp_path / "w", ids, None)


# ------------------------------------------------------------------------------------------------- memory

MEASURE = PRELUDE + textwrap.dedent("""
    src, layerwise_out, whole_out = sys.argv[1], sys.argv[2], sys.argv[3]
    import os, torch, transformers
    import transformers.models.llama.modeling_llama  # library code: imported before the baselines
    from compact import models, slicing
    from compact.layerwise_slicing import write_layerwise
    config = transformers.AutoConfig.from_pretrained(src)
    ids = list(range(0, config.vocab_size, 2))
    channels = {f"model.layers.{i}.mlp": list(range(0, config.intermediate_size, 2))
                for i in range(config.num_hidden_layers)}
    # Layerwise first: memory it leaves to the allocator could only make the in-memory figure smaller.
    base = start()
    os.mkdir(layerwise_out)
    write_layerwise(src, layerwise_out, ids, channels)
    figures = {"layerwise": {"base": base, "peak": status()["VmHWM"]}}
    base = start()
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    slicing.slice_model(model, ids, channels)
    model.save_pretrained(whole_out)
    figures["in-memory"] = {"base": base, "peak": status()["VmHWM"]}
    print(json.dumps(figures))
""")


def measure(src: Path, layerwise_out: Path, whole_out: Path) -> dict[str, dict]:
    """Both paths in one fresh process, each from a reset high-water mark: {mode: {base, peak} RSS in bytes}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(layerwise_out), str(whole_out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # peak RSS of its own fresh process: other tests beside it do not move it
def test_peak_memory_about_two_tensors(tmp_path):
    """A ~200 MB model whose largest tensors (embedding, head) are 16 MiB: layerwise slicing's peak RSS stays
    near two of them, while the in-memory path holds the model. Prints the figures."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) to read the peak RSS")
    model = tiny_models.big_llama(intermediate=1536, vocab=8192)
    model.save_pretrained(tmp_path / "src", max_shard_size="100MB")
    largest = max(p.numel() * 4 for p in model.parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    del model
    peaks = measure(tmp_path / "src", tmp_path / "layerwise", tmp_path / "whole")
    layerwise, whole = peaks["layerwise"], peaks["in-memory"]
    assert_same_checkpoint(tmp_path / "layerwise", tmp_path / "whole", "200 MB model")
    mb = 1 / 2**20
    s_peak, w_peak = (layerwise["peak"] - layerwise["base"]) * mb, (whole["peak"] - whole["base"]) * mb
    print(f"\nlayerwise prune of a {total * mb:.0f} MiB model (largest tensor {largest * mb:.0f} MiB): peak RSS "
          f"above the post-import baseline {s_peak:.0f} MiB = {s_peak / (largest * mb):.2f} x the largest tensor; "
          f"in memory (load, slice, save_pretrained) {w_peak:.0f} MiB")
    assert s_peak < 2.5 * largest * mb + 16, f"layerwise peak {s_peak:.0f} MiB is more than ~2 largest tensors"
