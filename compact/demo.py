"""`compact demo`: the whole job on an embedded default, offline, in well under a minute on a CPU.

A small Llama is built from a seeded config with a byte-level BPE tokenizer trained on text written for
the project, trained briefly so its FFN means something, saved as a standard checkpoint, then pruned on both
axes by the same pipeline the CLI runs (fused scores checked against the hook reference), reloaded with plain
`transformers`, and evaluated before and after (bits per byte, so different tokenizers compare fairly).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from . import demo_text, evaluate, loading, output, pruning, tables
from .options import CalibOptions, Method, Run

MARKER = ".compact_demo"
SEQ_LEN = 128


def train_tokenizer(texts: list[str], vocab_size: int = 640):
    """A byte-level BPE tokenizer (ids = merge ranks, as in Llama 3 / Qwen) trained offline on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens(["<|bos|>", "<|eos|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")


def build_model(vocab_size: int, bos: int, eos: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=96, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos)
    return LlamaForCausalLM(config)


def train(model, ids: torch.Tensor, steps: int, batch: int = 16, lr: float = 3e-3) -> None:
    """A few hundred AdamW steps of next-token training on random windows of `ids` (seeded)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = ids[torch.randint(0, ids.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def bits_per_byte(model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """(bits per UTF-8 byte, tokens) of `texts`, each scored as one sequence starting with BOS."""
    nats, tokens, nbytes = 0.0, 0, 0
    for text in texts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids]])
        total, count = evaluate.nll(model, ids, progress=False)
        nats, tokens, nbytes = nats + total, tokens + count, nbytes + len(text.encode())
    return nats / math.log(2) / nbytes, tokens


def _prepare_out(out: Path) -> None:
    """The demo writes only into a fresh folder or one it made before (marked), never over user files."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"--out {out} exists and was not made by compact demo; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def run_demo(out: Path, quiet: bool = False) -> int:
    from transformers.utils import logging as hf_logging

    out = Path(out)
    _prepare_out(out)
    hf_logging.disable_progress_bar()
    say = (lambda *a: None) if quiet else print
    start = time.perf_counter()
    train_texts, calib_texts, eval_texts = (demo_text.stories(n, seed) for n, seed in ((600, 1), (64, 2), (48, 3)))
    model, tokenizer = _base_model(out, train_texts, say)
    calib_file = out / "calibration.txt"
    calib_file.write_text("\f".join(calib_texts))
    variants = _prune_variants(out, model, len(tokenizer) - 2, calib_file, say)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def reload(folder):
        return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)

    both = out / "both"
    pruned, pruned_tok = reload(both)
    prompt = pruned_tok("Ada and Ben carried", return_tensors="pt", add_special_tokens=False).input_ids
    sample = pruned.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=pruned_tok.eos_token_id)
    say(f"[4/5] {both} reloads with AutoModelForCausalLM + AutoTokenizer; greedy: {pruned_tok.decode(sample[0])!r}")

    rows = []
    models_ = {"original": (model, tokenizer)}
    models_.update({name: reload(out / name) for name in variants})
    for name, (m, tok) in models_.items():
        bpb, tokens = bits_per_byte(m, tok, eval_texts)
        rows.append((name, f"{sum(p.numel() for p in m.parameters()):,}", m.config.vocab_size,
                     m.config.intermediate_size, tokens, f"{bpb:.4f}"))
    say(f"[5/5] held-out evaluation on {len(eval_texts)} unseen stories (bits per byte: lower is better); each "
        f"row is the folder of that name in {out}: vocab90 keeps 90% of the vocabulary, ffn75 75% of the FFN by "
        f"common act^2 (re-fitted), ffn75-random 75% of the FFN at random, both the first two together")
    print(tables.format_table(("model", "parameters", "vocab", "FFN", "held-out tokens", "bits/byte"), rows))
    say(f"demo finished in {time.perf_counter() - start:.1f}s; files in {out}")
    return 0


def _base_model(out: Path, train_texts: list[str], say):
    """Steps 1-2: a byte-level BPE tokenizer and a small Llama trained on the demo stories, saved to out/base."""
    tokenizer = train_tokenizer(train_texts)
    say(f"[1/5] tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained on {len(train_texts)} demo stories")
    eos = tokenizer.eos_token_id
    stream = [t for text in train_texts for t in tokenizer(text, add_special_tokens=False).input_ids + [eos]]
    windows = torch.tensor(stream[: len(stream) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    model = build_model(len(tokenizer), tokenizer.bos_token_id, eos)
    train(model, windows, steps=150)
    base = out / "base"
    with output.staged_dir(base, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    say(f"[2/5] model: Llama, {sum(p.numel() for p in model.parameters()):,} parameters, trained 150 steps "
        f"-> {base}")
    return model, tokenizer


def _prune_variants(out: Path, model, regular: int, calib_file: Path, say) -> dict:
    """Step 3: out/base pruned four ways through the pipeline, each into the folder its table row names: vocab90
    (90% of the vocabulary), ffn75 (75% of the FFN by common act^2, re-fitted), ffn75-random (75% of the FFN, random
    channels), both; {folder: (vocab, FFN, scores)}."""
    calib = CalibOptions(str(calib_file), 16, SEQ_LEN)
    random_scores = out / "random_scores.safetensors"
    gen = torch.Generator().manual_seed(0)
    output.save_scores({f"model.layers.{i}.mlp": torch.rand(384, generator=gen, dtype=torch.float64)
                        for i in range(model.config.num_hidden_layers)}, random_scores, overwrite=True)
    variants = {  # folder under `out`: (vocab_keep, ffn_keep, scores file)
        "vocab90": (regular * 9 // 10, None, None),
        "ffn75": (None, 0.75, None),
        "ffn75-random": (None, 0.75, str(random_scores)),
        "both": (regular * 9 // 10, 0.75, None),
    }
    reports = {}
    for name, (vocab_keep, ffn_keep, scores) in variants.items():
        check = scores is None and ffn_keep is not None  # --check compares the FFN scoring pass with hooks
        method = Method(vocab_keep=vocab_keep, ffn_keep=ffn_keep, scores=scores)
        reports[name] = pruning.prune(loading.load(str(out / "base"), dtype="float32"), out / name, method,
                                       calib, Run(batch_size=4, check=check, progress=False), overwrite=True)
    check = reports["both"]["checks"]["scores_vs_hooks"]
    say(f"[3/5] pruned {len(variants)} ways by the CLI pipeline; fused scores vs forward hooks: "
        f"max relative difference {check['max_rel_diff']:.2g} (rtol {check['rtol']:g})")
    return variants
