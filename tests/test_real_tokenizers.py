"""End-to-end `compact` CLI runs on tiny random models paired with REAL tokenizers and real text.

Each case saves a seeded random model (hidden 16, 2 layers, FFN 64) with the real vocabulary size and a real
tokenizer, prunes it with `compact prune` (vocabulary to 2000 regular tokens + specials, FFN to half) on
sotu.txt, then checks the checkpoint loads in plain transformers and is consistent with the original:
tokenizer, embedding rows, FFN channels, special ids, report, generation, and `compact score` + `compact
prune --scores` reproducing the one-go selection. Skips (with the reason) when ../shared/data or the
test-only tokenizer packages are absent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from compact.cli import main
from tokenizers_fixtures import llama2_tokenizer, llama32_tokenizer, qwen25_tokenizer, sotu_paragraphs

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS, FFN, FFN_KEPT, VOCAB_KEEP = 16, 2, 64, 32, 2000
# float32 also on a GPU (where auto means bfloat16), so the exact-copy and bit-identical checks hold there too
CALIB_ARGS = ["--samples", "4", "--seq-len", "128", "--dtype", "float32"]
DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}  # as in test_vocab.py
SPECIAL_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id")
PARTS = ("embedding", "head", "attention", "ffn", "other", "total")
PHASES = {"vocabulary", "calibration", "scoring", "selection", "slicing", "save"}


def _llama(vocab, tied, bos, eos, pad=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return LlamaForCausalLM, config


def _qwen2(vocab, tied, bos, eos, pad=None):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    return Qwen2ForCausalLM, config


# name -> (tokenizer loader taking a scratch folder, model builder, config kwargs, generation-config ids),
# special ids as in the real checkpoints (Llama 3.2 Instruct, Qwen2.5 Instruct, Llama 2)
CASES = {
    "llama3.2": (lambda folder: llama32_tokenizer(), _llama,
                 dict(vocab=128256, tied=True, bos=128000, eos=[128001, 128008, 128009]),
                 dict(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])),
    "qwen2.5": (lambda folder: qwen25_tokenizer(), _qwen2,
                dict(vocab=151936, tied=True, bos=151643, eos=151645),
                dict(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643)),
    "llama2": (llama2_tokenizer, _llama,
               dict(vocab=32000, tied=False, bos=1, eos=2),
               dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)),
}


def _run(argv: list) -> tuple[int, str, str]:
    """compact.cli.main in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _report(folder: Path) -> dict:
    return json.loads((folder / "compact_report.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """calib.txt (the first 60 sotu paragraphs) and held-out.txt (the next 100), plus the held-out paragraphs."""
    paragraphs = sotu_paragraphs(160)
    folder = tmp_path_factory.mktemp("corpus")
    calib, held = folder / "calib.txt", folder / "held-out.txt"
    calib.write_text("\n\n".join(paragraphs[:60]), encoding="utf-8")
    held.write_text("\n\n".join(paragraphs[60:]), encoding="utf-8")
    return SimpleNamespace(calib=calib, held=held, held_paragraphs=paragraphs[60:])


@pytest.fixture(scope="module", params=list(CASES))
def case(request, corpus, tmp_path_factory):
    """One real tokenizer + tiny random model saved to src/, then `compact prune` run in-process into out/."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    name = request.param
    load_tokenizer, build, config_kwargs, generation_ids = CASES[name]
    folder = tmp_path_factory.mktemp(name)
    scratch = folder / "tokenizer-scratch"
    scratch.mkdir()
    tokenizer = load_tokenizer(scratch)  # skips when the real tokenizer is absent
    model_class, config = build(**config_kwargs)
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(**generation_ids)
    src, out = folder / "src", folder / "out"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)

    rc, stdout, stderr = _run(["prune", src, "--out", out, "--vocab-keep", VOCAB_KEEP, "--ffn-keep", "0.5",
                               "--ffn-multiple", "16", "--calib", corpus.calib, *CALIB_ARGS, "--check", "--quiet",
                               "--refit", "none"])  # exact slices: the re-fits are tests/test_engine.py's
    assert rc == 0, f"compact prune failed ({rc}): {stderr}"
    return SimpleNamespace(
        name=name, src=src, out=out, folder=folder, stdout=stdout, stderr=stderr, tied=config_kwargs["tied"],
        report=_report(out), real_tok=tokenizer,
        orig_model=AutoModelForCausalLM.from_pretrained(src).eval(), orig_tok=AutoTokenizer.from_pretrained(src),
        model=AutoModelForCausalLM.from_pretrained(out).eval(), tok=AutoTokenizer.from_pretrained(out),
    )


def test_quiet_prune_prints_nothing(case):
    assert case.stdout == "" and case.stderr == ""


def test_checkpoint_loads_with_consistent_sizes(case):
    kept, sizes = case.report["kept_token_ids"], case.report["sizes"]
    vocab = case.model.config.vocab_size
    assert len(case.tok) == vocab == len(kept) == sizes["vocab_after"]
    assert case.model.get_input_embeddings().weight.shape == (vocab, HIDDEN)
    assert case.model.get_output_embeddings().weight.shape == (vocab, HIDDEN)
    assert kept == sorted(set(kept)) and kept[-1] < case.orig_model.config.vocab_size == sizes["vocab_before"]
    assert VOCAB_KEEP < vocab < VOCAB_KEEP + 300  # 2000 regular + specials (+ a few base symbols for Llama 2)
    assert case.model.config.intermediate_size == sizes["intermediate_after"] == FFN_KEPT
    assert case.model.config.tie_word_embeddings == case.tied
    if case.tied:
        assert case.model.get_output_embeddings().weight is case.model.get_input_embeddings().weight
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "compact_scores.safetensors"):
        assert (case.out / name).is_file(), f"{name} missing from the pruned checkpoint"


def test_held_out_text_encodes_in_range_and_round_trips(case, corpus):
    """Lossless as the original (whose own round trip may drop a leading space), and the same text as before."""
    kept, vocab = case.report["kept_token_ids"], case.model.config.vocab_size
    # the source checkpoint carries the real tokenizer (what the CLI pruned is what the fixture built)
    assert case.orig_tok(corpus.held_paragraphs).input_ids == case.real_tok(corpus.held_paragraphs).input_ids
    encoded = case.tok(corpus.held_paragraphs).input_ids
    for text, ids in zip(corpus.held_paragraphs, encoded):
        assert max(ids) < vocab, f"emitted id {max(ids)} >= vocab_size {vocab} for {text[:40]!r}"
        expected = case.orig_tok.decode(case.orig_tok(text).input_ids, **DECODE)
        assert expected == text or text.startswith(" ")
        assert case.tok.decode(ids, **DECODE) == expected, f"round trip changed {text[:40]!r}"
        # the new ids mean the same tokens: mapped back to old ids, the original decodes the same text
        assert case.orig_tok.decode([kept[i] for i in ids], **DECODE) == expected
    # a pruned vocabulary still merges: far fewer tokens than bytes (no fall-back to single bytes)
    assert sum(map(len, encoded)) < 0.6 * sum(len(t.encode()) for t in corpus.held_paragraphs)


def test_token_strings_follow_kept_ids(case):
    kept = case.report["kept_token_ids"]
    assert case.tok.convert_ids_to_tokens(list(range(len(kept)))) == case.orig_tok.convert_ids_to_tokens(kept)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(case.tok, attr) == getattr(case.orig_tok, attr), attr


def test_weights_are_exact_slices(case):
    kept, channels = case.report["kept_token_ids"], case.report["kept_channels"]
    index = torch.tensor(kept)
    orig, new = case.orig_model, case.model
    assert torch.equal(new.get_input_embeddings().weight, orig.get_input_embeddings().weight[index])
    assert torch.equal(new.get_output_embeddings().weight, orig.get_output_embeddings().weight[index])
    assert len(channels) == LAYERS
    for i, (old_layer, new_layer) in enumerate(zip(orig.model.layers, new.model.layers)):
        assert channels[i] == sorted(set(channels[i])) and len(channels[i]) == FFN_KEPT
        assert 0 <= channels[i][0] and channels[i][-1] < FFN
        c = torch.tensor(channels[i])
        for proj in ("gate_proj", "up_proj"):
            assert torch.equal(getattr(new_layer.mlp, proj).weight, getattr(old_layer.mlp, proj).weight[c])
        assert torch.equal(new_layer.mlp.down_proj.weight, old_layer.mlp.down_proj.weight[:, c])
        for (key, a), (_, b) in zip(old_layer.self_attn.state_dict().items(), new_layer.self_attn.state_dict().items()):
            assert torch.equal(a, b), f"layer {i} attention {key} changed"


def test_generate_from_an_encoded_prompt(case, corpus):
    vocab = case.model.config.vocab_size
    prompt = case.tok(corpus.held_paragraphs[0][:200], return_tensors="pt")
    with torch.no_grad():
        out = case.model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=case.tok.pad_token_id or case.tok.eos_token_id)
    assert out.shape == (1, prompt.input_ids.shape[1] + 8)
    assert torch.equal(out[0, :prompt.input_ids.shape[1]], prompt.input_ids[0])
    assert 0 <= int(out.min()) and int(out.max()) < vocab
    assert isinstance(case.tok.decode(out[0]), str)


def test_special_ids_point_at_the_same_tokens(case):
    for which in ("config", "generation_config"):
        before, after = getattr(case.orig_model, which), getattr(case.model, which)
        for attr in SPECIAL_ATTRS:
            old, new = getattr(before, attr, None), getattr(after, attr, None)
            if old is None:
                assert new is None, f"{which}.{attr}"
                continue
            old_ids, new_ids = (old, new) if isinstance(old, list) else ([old], [new])
            assert isinstance(new, type(old)), f"{which}.{attr}: {old!r} became {new!r}"
            assert case.tok.convert_ids_to_tokens(new_ids) == case.orig_tok.convert_ids_to_tokens(old_ids), \
                f"{which}.{attr}: {old!r} -> {new!r}"
    for attr in SPECIAL_ATTRS:  # the tokenizer agrees with the config
        if getattr(case.orig_tok, attr) is not None:
            assert getattr(case.tok, attr) == case.report["kept_token_ids"].index(getattr(case.orig_tok, attr))


def test_report_has_parameters_by_part_and_timings(case):
    report = case.report
    params, sizes = report["parameters"], report["sizes"]
    vocab_before, vocab_after = sizes["vocab_before"], sizes["vocab_after"]
    assert sizes == {"vocab_before": vocab_before, "vocab_after": vocab_after, "intermediate_before": FFN,
                     "intermediate_after": FFN_KEPT, "layers": LAYERS, "hidden": HIDDEN}
    for when, model, vocab, ffn in (("before", case.orig_model, vocab_before, FFN),
                                    ("after", case.model, vocab_after, FFN_KEPT)):
        counts = params[when]
        assert set(counts) == set(PARTS)
        assert counts["embedding"] == vocab * HIDDEN
        assert counts["head"] == (0 if case.tied else vocab * HIDDEN)
        assert counts["ffn"] == LAYERS * 3 * HIDDEN * ffn
        assert counts["total"] == sum(p.numel() for p in model.parameters()) == sum(counts[p] for p in PARTS[:-1])
    assert params["after"]["attention"] == params["before"]["attention"] > 0
    assert params["after"]["other"] == params["before"]["other"] > 0
    assert params["after"]["total"] < params["before"]["total"]
    assert PHASES <= set(report["timings_s"])
    assert all(isinstance(t, float) and t >= 0 for t in report["timings_s"].values())
    assert report["checks"]["scores_vs_hooks"]["ok"] is True
    assert report["calibration"].startswith("calib.txt: 4 x 128 tokens")
    assert report["tokenizer"] == "pruned to kept_token_ids"


def test_score_then_prune_with_scores_matches_one_go(case, corpus):
    scores, out2 = case.folder / "scores.safetensors", case.folder / "out-from-scores"
    rc, _, err = _run(["score", case.src, "--calib", corpus.calib, *CALIB_ARGS, "--vocab-keep", VOCAB_KEEP,
                       "--out", scores, "--quiet"])
    assert rc == 0, err
    # --calib again for the token counts of the frequency-ordered vocabulary (the default with --calib)
    rc, _, err = _run(["prune", case.src, "--scores", scores, "--ffn-keep", FFN_KEPT, "--vocab-keep", VOCAB_KEEP,
                       "--calib", corpus.calib, "--out", out2, "--dtype", "float32", "--quiet"])
    assert rc == 0, err
    one_go, two_step = case.report, _report(out2)
    assert two_step["kept_channels"] == one_go["kept_channels"]
    assert two_step["kept_token_ids"] == one_go["kept_token_ids"]
    assert two_step["scores_file"] == str(scores) and two_step["calibration"] is None
    assert "calibration" not in two_step["timings_s"] and "scoring" not in two_step["timings_s"]
    saved, computed = load_file(str(scores)), load_file(str(case.out / "compact_scores.safetensors"))
    assert saved.keys() == computed.keys() == {f"model.layers.{i}.mlp" for i in range(LAYERS)}
    for key in saved:  # deterministic: the same data and vocabulary give bit-identical scores
        assert saved[key].dtype == torch.float64 and torch.equal(saved[key], computed[key]), key
    weights, weights2 = load_file(str(case.out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert weights.keys() == weights2.keys()
    assert all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert (out2 / "tokenizer.json").read_text() == (case.out / "tokenizer.json").read_text()


def test_eval_prints_perplexity(case, corpus):
    rc, stdout, stderr = _run(["eval", case.out, "--data", corpus.held, *CALIB_ARGS, "--quiet"])
    assert rc == 0, stderr
    match = re.search(r"^perplexity\s+([0-9.]+)$", stdout, re.M)
    assert match, stdout
    # a random model predicts roughly uniformly over its (pruned) vocabulary
    assert 1 < float(match.group(1)) < 10 * case.model.config.vocab_size
    assert re.search(rf"^parameters: total\s+{case.report['parameters']['after']['total']:,}$", stdout, re.M)


def _python_m_compact(*argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "compact", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama3.2"], indirect=True)  # once: a fresh process costs seconds
def test_python_m_compact_eval_and_one_line_error(case, corpus):
    """The module entry point in a fresh process: eval succeeds quietly; a bad --vocab-keep is one line, exit 2."""
    done = _python_m_compact("eval", case.out, "--data", corpus.held, *CALIB_ARGS, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 1, done.stderr
    assert re.search(r"^perplexity\s+[0-9.]+$", done.stdout, re.M), done.stdout

    bad_out = case.folder / "out-bad"
    done = _python_m_compact("prune", case.src, "--out", bad_out, "--vocab-keep", 200000, "--quiet")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("compact prune: error:"), done.stderr
    assert "--vocab-keep" in lines[0] and "128000" in lines[0]  # the real number of regular tokens
    assert not bad_out.exists()


def test_tokenizer_option_for_a_model_without_one(corpus, shared_data, tmp_path):
    """A model saved without a tokenizer: text data fails with a hint; --tokenizer (the SentencePiece file, or a
    folder) makes calibration and eval work, and the pruned checkpoint carries the cut tokenizer."""
    from transformers import AutoTokenizer

    model_class, config = _llama(vocab=32000, tied=False, bos=1, eos=2)
    torch.manual_seed(0)
    src = tmp_path / "bare"
    model_class(config).eval().save_pretrained(src)
    args = ["--calib", corpus.calib, *CALIB_ARGS, "--vocab-keep", VOCAB_KEEP, "--ffn-keep", "0.5",
            "--ffn-multiple", "16", "--quiet"]
    rc, _, stderr = _run(["prune", src, "--out", tmp_path / "no", *args])
    assert rc == 2 and "--tokenizer" in stderr and ".npy" in stderr, stderr

    spm = shared_data / "llama2-tokenizer.model"
    rc, _, stderr = _run(["prune", src, "--out", tmp_path / "out", "--tokenizer", spm, *args])
    assert rc == 0, stderr
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    kept = _report(tmp_path / "out")["kept_token_ids"]
    assert len(tok) == len(kept) and len(kept) < 32000
    text = corpus.held_paragraphs[0]
    assert tok.decode(tok(text, add_special_tokens=False).input_ids, **DECODE) == text

    rc, _, stderr = _run(["eval", tmp_path / "out", "--tokenizer", spm, "--data", corpus.held, *CALIB_ARGS, "--quiet"])
    assert rc == 2 and "ids up to 31,999" in stderr, "the full tokenizer does not fit the pruned model: " + stderr
    rc, stdout, stderr = _run(["eval", src, "--tokenizer", spm, "--data", corpus.held, *CALIB_ARGS, "--quiet"])
    assert rc == 0 and re.search(r"^bits / byte\s+[0-9.]+$", stdout, re.M), stdout + stderr
    rc, _, stderr = _run(["eval", src, "--tokenizer", tmp_path / "missing.json", "--data", corpus.held, "--quiet"])
    assert rc == 2 and "missing.json" in stderr, stderr


def test_gguf_export_reads_back_with_the_same_ids_and_logits(case, corpus):
    """Issue 21: each real tokenizer's pruned model as GGUF (F32) loads with transformers' GGUF reader: the same
    logits, 40 held-out paragraphs encoded to the same ids, and the pre-tokenizer llama.cpp's converter names."""
    pytest.importorskip("gguf")
    from test_export import check_roundtrip, metadata

    from compact import export

    rc, _, err = _run(["export", case.out, "--gguf", "f32", "--quiet"])
    assert rc == 0, err
    check_roundtrip(case.out, "f32", corpus.held_paragraphs[:40])
    meta = metadata(export.gguf_path(case.out, "f32"))
    want = {"llama3.2": ("gpt2", "llama-bpe"), "qwen2.5": ("gpt2", "qwen2"), "llama2": ("llama", "default")}
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == want[case.name]
    arch = "qwen2" if case.name == "qwen2.5" else "llama"
    assert meta[f"{arch}.vocab_size"] == len(case.report["kept_token_ids"]) and meta[f"{arch}.context_length"] == 256
    assert meta[f"{arch}.feed_forward_length"] == FFN_KEPT
