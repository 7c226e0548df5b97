"""Long runs: a SIGKILLed scoring run resumes without redoing saved batches; torchrun over 2 gloo ranks."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from compact import cli
from kernel_ops.tolerances import assert_close, decoder_rtol


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama checkpoint and 2-D calibration ids, slow enough per batch to be killed mid-run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    ids = np.random.default_rng(0).integers(0, 300, size=(96, 256))
    np.save(root / "calib.npy", ids)
    args = ["score", str(root / "model"), "--calib", str(root / "calib.npy"), "--samples", "96", "--seq-len", "256",
            "--vocab-keep", "200", "--quiet"]
    assert cli.main(args + ["--out", str(root / "plain.safetensors")]) == 0
    return root, args


def close(a, b, model_dir):
    """Equal sums up to float32 rounding: other batch splits, ranks and thread counts round the forward
    differently, within the bound of the network's arithmetic (tests/kernel_ops/tolerances.py). Skipping or
    double-counting one of the 96 sequences moves the sums by about 1%, several times this bound."""
    from transformers import AutoConfig

    assert sorted(a) == sorted(b)
    rtol = decoder_rtol(AutoConfig.from_pretrained(model_dir), 256)
    for name in a:
        assert_close(a[name], b[name], rtol=rtol, atol=rtol * float(b[name].abs().max()), what=name)


def test_killed_run_resumes_from_its_checkpoint(tiny, tmp_path, compute):
    root, args = tiny
    args = [*args[:-1], *compute.args, args[-1]]  # (--quiet stays last: the test drops it below)
    out = tmp_path / "scores.safetensors"
    ckpt = tmp_path / "scores.safetensors.ckpt"
    command = [sys.executable, "-m", "compact", *args, "--out", str(out), "--checkpoint-every", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ckpt.exists(), f"no checkpoint appeared (exit {proc.poll()}): {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a final output"
    with safe_open(str(ckpt), "pt") as f:
        saved = int(f.metadata()["next_batch"])
    assert 2 <= saved < 96 and saved % 2 == 0

    # other arguments: refused; no --resume: refused; nothing written
    assert cli.main(args[:-1] + ["--out", str(out), "--resume", "--batch-size", "2"]) == 2
    assert cli.main(args + ["--out", str(out)]) == 2
    assert not out.exists() and ckpt.exists()

    assert cli.main(args + ["--out", str(out), "--resume", "--checkpoint-every", "2"]) == 0
    with safe_open(str(out), "pt") as f:
        resumed = int(f.metadata()["resumed_from_batch"])
    assert resumed >= saved, "the resumed run redid batches it had saved"
    assert not ckpt.exists(), "a finished run removes its checkpoint"
    plain = root / "plain.safetensors"
    if compute.device != "cpu":  # the reference computed where the run computes
        plain = tmp_path / "plain.safetensors"
        assert cli.main(args + ["--out", str(plain)]) == 0
    close(load_file(str(out)), load_file(str(plain)), root / "model")


@pytest.mark.serial  # two ranks of its own: alone on the machine, not beside two test workers
def test_torchrun_two_gloo_ranks_match_one_process(tiny, tmp_path):
    root, args = tiny
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "compact", *args, "--out", str(out)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    close(load_file(str(out)), load_file(str(root / "plain.safetensors")), root / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.safetensors"]


def test_offload_layerwise_matches_in_memory(tiny, tmp_path):
    root, args = tiny
    out = tmp_path / "layerwise.safetensors"
    assert cli.main(args + ["--out", str(out), "--offload", "layerwise", "--check", "--batch-size", "4"]) == 0
    close(load_file(str(out)), load_file(str(root / "plain.safetensors")), root / "model")


def test_layerwise_prune_writes_the_in_memory_checkpoint(tiny, tmp_path):
    import json

    root, _ = tiny
    common = ["prune", str(root / "model"), "--scores", str(root / "plain.safetensors"), "--vocab-keep", "200",
              "--ffn-keep", "256", "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "memory")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "layerwise"), "--offload", "layerwise"]) == 0
    tensors = {kind: {k: v for f in sorted((tmp_path / kind).glob("model*.safetensors")) for k, v in load_file(str(f)).items()}
               for kind in ("memory", "layerwise")}
    assert sorted(tensors["memory"]) == sorted(tensors["layerwise"])
    for name, value in tensors["memory"].items():
        other = tensors["layerwise"][name]
        assert value.dtype == other.dtype and torch.equal(value.view(torch.uint8), other.view(torch.uint8)), name
    reports = {k: json.loads((tmp_path / k / "compact_report.json").read_text()) for k in ("memory", "layerwise")}
    for key in ("kept_token_ids", "kept_channels", "sizes", "parameters"):
        assert reports["memory"][key] == reports["layerwise"][key], key


def test_a_checkpoint_carries_every_sum(tmp_path):
    """save_checkpoint / load_checkpoint carry one Sums whole: scores, plain act^2, the Gram matrices (allocated
    here or not yet) and the token mass."""
    from compact import runs
    from compact.sums import Sums

    names = ["model.layers.0.mlp", "model.layers.1.mlp"]
    sums = Sums(names, 5, "cpu", plain=True, gram=True)
    for name in names:
        sums.scores[name].uniform_()
        sums.plain[name].uniform_()
    sums.add_gram(names[0], torch.randn(3, 4, 5), torch.rand(3, 4))
    sums.mass += 7.5
    runs.save_checkpoint(tmp_path / "ckpt", sums, 3, {"samples": 8})
    fresh = Sums(names, 5, "cpu", plain=True, gram=True)
    assert runs.load_checkpoint(tmp_path / "ckpt", fresh, {"samples": 8}) == 3
    saved, loaded = sums.state_dict(), fresh.state_dict()
    assert list(loaded) == list(saved) and all(torch.equal(loaded[k], v) for k, v in saved.items())
