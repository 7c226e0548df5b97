"""llama2.c legacy checkpoint loading: the real stories260K against the C reference, synthetic files for the rest."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from compact.llama2c import is_llama2c_checkpoint, load_llama2c

SHARED_DATA = Path(os.environ.get("COMPACT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STORIES = SHARED_DATA / "stories260K.bin"
# Greedy decoding from BOS by the reference C implementation (shared/data/README.md).
EXPECTED = [int(x) for x in (
    "461 461 401 401 401 461 378 455 473 456 435 299 362 409 283 264 283 452 288 13 "
    "431 431 431 431 431 431 431 431 431 431 431 431 431 293 430 417 363 416 315 342").split()]


@pytest.fixture(scope="module")
def stories():
    if not STORIES.is_file():
        pytest.skip(f"real checkpoint not available: {STORIES} (set COMPACT_SHARED_DATA)")
    return STORIES


def write_checkpoint(path, dim=8, hidden=12, layers=2, heads=2, kv_heads=1, vocab=-16, seq_len=6, seed=0):
    """A random llama2.c file; returns the float32 arrays in file order (RoPE tables included)."""
    head_dim, kv = dim // heads, kv_heads * dim // heads
    shapes = [(abs(vocab), dim), (layers, dim), (layers, dim, dim), (layers, kv, dim), (layers, kv, dim),
              (layers, dim, dim), (layers, dim), (layers, hidden, dim), (layers, dim, hidden),
              (layers, hidden, dim), (dim,), (2, seq_len, head_dim // 2)] + ([(abs(vocab), dim)] if vocab < 0 else [])
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    with open(path, "wb") as f:
        np.array([dim, hidden, layers, heads, kv_heads, vocab, seq_len], dtype="<i4").tofile(f)
        for a in arrays:
            a.astype("<f4").tofile(f)
    return arrays


def test_stories260k_greedy_matches_reference(stories):
    model = load_llama2c(stories)
    assert not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=len(EXPECTED), pad_token_id=0)
    assert out[0, 1:].tolist() == EXPECTED


def test_stories260k_config(stories):
    c = load_llama2c(stories).config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 8)
    assert (c.vocab_size, c.max_position_embeddings, c.tie_word_embeddings) == (512, 512, True)
    assert (c.rms_norm_eps, c.rope_parameters["rope_theta"], c.bos_token_id, c.eos_token_id) == (1e-5, 10000.0, 1, 2)
    assert c.hidden_act == "silu" and not c.attention_bias and not c.mlp_bias
    assert is_llama2c_checkpoint(stories)


def test_stories260k_bf16(stories):
    model = load_llama2c(stories, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_untied_classifier_and_qk_permutation(tmp_path):
    path = tmp_path / "untied.bin"
    embed, _, wq, wk, wv, *_, classifier = write_checkpoint(path)
    assert is_llama2c_checkpoint(path)
    model = load_llama2c(path)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, torch.from_numpy(classifier), rtol=0, atol=0)
    torch.testing.assert_close(model.model.embed_tokens.weight, torch.from_numpy(embed), rtol=0, atol=0)
    attn = model.model.layers[1].self_attn
    # head_dim 4: llama2.c pairs (0,1), (2,3) become HF halves (0,2 | 1,3) in each head.
    order = [0, 2, 1, 3]
    torch.testing.assert_close(attn.q_proj.weight, torch.from_numpy(wq[1][order + [4 + i for i in order]]))
    torch.testing.assert_close(attn.k_proj.weight, torch.from_numpy(wk[1][order]))
    torch.testing.assert_close(attn.v_proj.weight, torch.from_numpy(wv[1]))


def test_tied_synthetic(tmp_path):
    path = tmp_path / "tied.bin"
    write_checkpoint(path, vocab=16)
    model = load_llama2c(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 16)


def test_garbage_file_raises(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(bytes(range(256)) * 40)
    assert not is_llama2c_checkpoint(path)
    with pytest.raises(ValueError, match="not a llama2.c checkpoint"):
        load_llama2c(path)


@pytest.mark.parametrize("delta", [-4, 4])
def test_size_mismatch_raises(tmp_path, delta):
    path = tmp_path / "ck.bin"
    write_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[:delta] if delta < 0 else data + bytes(delta))
    assert not is_llama2c_checkpoint(path)
    with pytest.raises(ValueError, match="implies .* bytes"):
        load_llama2c(path)


def test_short_and_missing_files(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x01\x00")
    assert not is_llama2c_checkpoint(short)
    with pytest.raises(ValueError, match="header"):
        load_llama2c(short)
    assert not is_llama2c_checkpoint(tmp_path / "absent.bin")
    with pytest.raises(FileNotFoundError):
        load_llama2c(tmp_path / "absent.bin")
