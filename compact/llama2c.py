"""Load llama2.c "legacy" checkpoints (e.g. karpathy's tinyllamas) as Hugging Face Llama models.

Format: 7 little-endian int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``
(negative ``vocab_size``: an untied classifier is stored last), then float32 arrays in ``Linear.weight``
layout: embedding, attention norms, wq, wk, wv, wo, FFN norms, w1 (gate), w2 (down), w3 (up), final norm,
two RoPE tables (skipped), [classifier]. There is no tokenizer: callers work with token ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import transformers

_HEADER = np.dtype("<i4")
_HEADER_BYTES = 7 * _HEADER.itemsize
_FLOAT = np.dtype("<f4")
_MAX_DIM = 1 << 20  # any larger header field means "not a llama2.c checkpoint"


@dataclass(frozen=True)
class _Header:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # absolute value
    seq_len: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Named array shapes in file order (the RoPE tables included, as one array)."""
        d, h, n, v, kv = self.dim, self.hidden_dim, self.n_layers, self.vocab_size, self.kv_dim
        shapes = [
            ("embed", (v, d)), ("attn_norm", (n, d)), ("wq", (n, d, d)), ("wk", (n, kv, d)),
            ("wv", (n, kv, d)), ("wo", (n, d, d)), ("ffn_norm", (n, d)), ("w1", (n, h, d)),
            ("w2", (n, d, h)), ("w3", (n, h, d)), ("norm", (d,)), ("rope", (2, self.seq_len, self.head_dim // 2)),
        ]
        return shapes if self.tied else shapes + [("classifier", (v, d))]

    def nbytes(self) -> int:
        return _HEADER_BYTES + _FLOAT.itemsize * sum(int(np.prod(s)) for _, s in self.shapes())


def _read_header(path) -> _Header:
    """Parse and validate the header against the file size; ValueError naming the file otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size < _HEADER_BYTES:
        raise ValueError(f"{path}: not a llama2.c checkpoint ({size} bytes, shorter than the 28-byte header)")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = (int(x) for x in np.fromfile(path, _HEADER, 7))
    fields = (dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len)
    if not all(0 < x <= _MAX_DIM for x in fields) or dim % heads or heads % kv_heads or (dim // heads) % 2:
        raise ValueError(f"{path}: not a llama2.c checkpoint (implausible header "
                         f"dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = {fields})")
    header = _Header(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, tied=vocab > 0)
    if size != header.nbytes():
        raise ValueError(f"{path}: not a llama2.c checkpoint (header {fields} implies "
                         f"{header.nbytes()} bytes, file has {size})")
    return header


def is_llama2c_checkpoint(path) -> bool:
    """True for a file whose 7-int32 header is plausible and whose size matches it exactly."""
    try:
        _read_header(path)
    except (ValueError, OSError):
        return False
    return True


def _config(header: _Header) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, head_dim=header.head_dim, hidden_act="silu",
        max_position_embeddings=header.seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=header.tied,
        bos_token_id=1, eos_token_id=2,
    )


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama2.c rotates adjacent pairs, HF Llama rotates halves: reorder each head's q/k rows."""
    rows, dim = w.shape
    return w.reshape(heads, rows // heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def _arrays(path, header: _Header) -> dict[str, np.ndarray]:
    """Read-only memmap views of every array in the file, by name."""
    flat = np.memmap(path, dtype=_FLOAT, mode="r", offset=_HEADER_BYTES)
    out, start = {}, 0
    for name, shape in header.shapes():
        n = int(np.prod(shape))
        out[name] = flat[start:start + n].reshape(shape)
        start += n
    return out


def _state_dict(a: dict[str, np.ndarray], header: _Header, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF Llama state dict; each tensor is one copy out of the memmap."""
    def t(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(x, dtype=np.float32)).to(dtype)

    sd = {"model.embed_tokens.weight": t(a["embed"]), "model.norm.weight": t(a["norm"])}
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = t(a["attn_norm"][i])
        sd[p + "self_attn.q_proj.weight"] = t(_unpermute(a["wq"][i], header.n_heads))
        sd[p + "self_attn.k_proj.weight"] = t(_unpermute(a["wk"][i], header.n_kv_heads))
        sd[p + "self_attn.v_proj.weight"] = t(a["wv"][i])
        sd[p + "self_attn.o_proj.weight"] = t(a["wo"][i])
        sd[p + "post_attention_layernorm.weight"] = t(a["ffn_norm"][i])
        sd[p + "mlp.gate_proj.weight"] = t(a["w1"][i])
        sd[p + "mlp.down_proj.weight"] = t(a["w2"][i])
        sd[p + "mlp.up_proj.weight"] = t(a["w3"][i])
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if header.tied else t(a["classifier"])
    return sd


def load_llama2c(path, dtype: torch.dtype = torch.float32) -> transformers.LlamaForCausalLM:
    """A `LlamaForCausalLM` in eval mode holding a llama2.c checkpoint's weights (tied when vocab_size > 0)."""
    header = _read_header(path)
    model = transformers.LlamaForCausalLM(_config(header)).to(dtype)
    model.load_state_dict(_state_dict(_arrays(path, header), header, dtype), strict=True)
    return model.eval()
