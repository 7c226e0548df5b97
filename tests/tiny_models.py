"""Tiny random models of every supported family, built offline from their configs: the one builder the family,
layerwise scoring and layerwise slicing tests share.

Special ids are spread out (Phi-3's pad/eos sit at the top of the vocabulary) so that renumbering them shows.
Weights are redrawn at std 1/sqrt(fan_in) and norms/biases jittered: with the stock init (std 0.02) the FFN
hardly moves the logits, and a wrong channel, row, mask or embedding scale would hide below 1e-5.
"""
from __future__ import annotations

import math

import torch
import transformers as tf

VOCAB, HIDDEN, INTER = 97, 32, 48

# case -> (model_type, Config class, config overrides)
CASES = {
    "llama": ("llama", tf.LlamaConfig, dict(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
    "llama-tied": ("llama", tf.LlamaConfig, dict(bos_token_id=1, eos_token_id=[2, 90], tie_word_embeddings=True)),
    "mistral": ("mistral", tf.MistralConfig, dict(bos_token_id=1, eos_token_id=2, sliding_window=4)),
    "qwen2": ("qwen2", tf.Qwen2Config, dict(bos_token_id=80, eos_token_id=81)),
    "qwen3": ("qwen3", tf.Qwen3Config, dict(bos_token_id=80, eos_token_id=81)),
    "gemma": ("gemma", tf.GemmaConfig, dict(pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    "gemma2": ("gemma2", tf.Gemma2Config, dict(pad_token_id=0, bos_token_id=2, eos_token_id=1, sliding_window=4)),
    "gemma3_text": ("gemma3_text", tf.Gemma3TextConfig,
                    dict(pad_token_id=0, bos_token_id=2, eos_token_id=1, sliding_window=4)),
    "phi3": ("phi3", tf.Phi3Config, dict(pad_token_id=96, bos_token_id=1, eos_token_id=95)),
}
SLIDING_CASES = ("gemma2", "gemma3_text")  # alternate sliding and full attention layers


def config(case: str, layers: int = 2):
    model_type, config_cls, overrides = CASES[case]
    extra = {}
    if case in SLIDING_CASES:
        extra["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    cfg = config_cls(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=8, intermediate_size=INTER, vocab_size=VOCAB, max_position_embeddings=64,
                     **overrides, **extra)
    assert cfg.model_type == model_type
    return cfg


def build(case: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    """A tiny float32 eval-mode model of `case` (see the module docstring for its weights)."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config(case, layers)).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():  # a tied matrix once
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def big_llama(intermediate: int, vocab: int, layers: int = 16, hidden: int = 512):
    """A float32 Llama for the peak-memory tests (16 layers of hidden 512: ~200-270 MB), seeded."""
    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                            num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
                            max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def byte_level_llama(root) -> tuple:
    """(a model folder, a calibration .txt) in `root`: the demo's tiny Llama with its byte-level BPE tokenizer,
    trained on stories, and other stories to calibrate on (what a GGUF export needs: a real tokenizer)."""
    from pathlib import Path

    from compact import demo, demo_text

    root, texts = Path(root), demo_text.stories(120, seed=1)
    tokenizer = demo.train_tokenizer(texts[:60])
    demo.build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "calib.txt").write_text("\f".join(texts[60:]), encoding="utf-8")
    return root / "model", root / "calib.txt"
