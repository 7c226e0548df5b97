"""The real-model tier: SmolLM2-135M-Instruct (tests/real_model.py) pruned by `compact`, checked with plain
transformers. Small calibration and short held-out text keep the tier to about a minute on two cores; the
full-size figures are bench/real_models.py's (`make real`). Skips, with the reason, without the package."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

import real_model
from compact import cli, evaluate, loading, pruning
from compact.options import CalibOptions
from compact.options import Method, Run
from kernel_ops.tolerances import assert_close, fp32_forward_rtol

CALIB = ["--samples", "4", "--seq-len", "64"]


@pytest.fixture(scope="module")
def smol(shared_data_dir_module, tmp_path_factory):
    """(checkpoint folder, calibration text, held-out text)."""
    try:
        folder = real_model.checkpoint()
    except real_model.Unavailable as e:
        pytest.skip(str(e))
    calib, held = real_model.split_text(shared_data_dir_module / "sotu.txt", tmp_path_factory.mktemp("text"))
    return folder, calib, held


@pytest.fixture(scope="module")
def shared_data_dir_module():
    from conftest import shared_data_dir

    path = shared_data_dir()
    if not (path / "sotu.txt").is_file():
        pytest.skip(f"{path / 'sotu.txt'} is absent (set COMPACT_SHARED_DATA)")
    return path


def _run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def pruned(smol, tmp_path_factory):
    """Half the vocabulary (frequency order, the default with --calib) and 75% of the FFN, with --check."""
    folder, calib, _ = smol
    out = tmp_path_factory.mktemp("pruned") / "out"
    rc, err = _run(["prune", folder, "--out", out, "--vocab-keep", 24576, "--ffn-keep", "0.75", "--calib", calib,
                    *CALIB, "--check", "--quiet"])
    assert rc == 0, err
    return out


def test_pruned_checkpoint_loads_in_plain_transformers(pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((pruned / "compact_report.json").read_text())
    model, tok = AutoModelForCausalLM.from_pretrained(pruned).eval(), AutoTokenizer.from_pretrained(pruned)
    assert model.config.vocab_size == len(report["kept_token_ids"]) == len(tok) < 49152
    assert model.config.intermediate_size == 1152 and report["vocab_order"] == "frequency"
    assert report["checks"]["scores_vs_hooks"]["ok"]
    ids = tok("The state of our union is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 8 and int(out.max()) < len(tok)


def test_cut_tokenizer_round_trips_held_out_text(pruned, smol):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pruned)
    paragraphs = [p for p in smol[2].read_text(encoding="utf-8").split("\n\n") if p.strip()][:40]
    for text in paragraphs:
        assert tok.decode(tok(text, add_special_tokens=False).input_ids, clean_up_tokenization_spaces=False) == text


def test_vocabulary_only_prune_keeps_the_kept_tokens_logits(smol, tmp_path):
    """Same decoder, same inputs: the pruned model's logits are the original's at the kept ids (the LM head's
    one dot product of hidden width may round differently over fewer rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, calib, held = smol
    out = tmp_path / "vocab"
    rc, err = _run(["prune", folder, "--out", out, "--vocab-keep", 12000, "--calib", calib, "--quiet"])
    assert rc == 0, err
    kept = torch.tensor(json.loads((out / "compact_report.json").read_text())["kept_token_ids"])
    tok = AutoTokenizer.from_pretrained(out)
    new_ids = tok(held.read_text(encoding="utf-8")[:1500], return_tensors="pt").input_ids[:, :200]
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).eval()(kept[new_ids]).logits[..., kept]
        got = AutoModelForCausalLM.from_pretrained(out).eval()(new_ids).logits
    rtol = fp32_forward_rtol(depth=1, width=576)
    assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), what="kept logits")


def test_common_act2_beats_random_and_magnitude_at_ffn_75(smol, tmp_path):
    folder, calib, held = smol
    nll = {}
    for criterion in ("common-act2", "random", "magnitude"):
        method = Method(ffn_keep="0.75", ffn_criterion=criterion)
        pruning.prune(loading.load(str(folder), dtype="float32"), tmp_path / criterion, method,
                       CalibOptions(str(calib), samples=4, seq_len=64), Run(progress=False))
        pruned = loading.load(str(tmp_path / criterion), dtype="float32")
        data = pruning.calibrate(pruned, CalibOptions(str(held), samples=1, seq_len=384))
        nll[criterion] = evaluate.evaluate(pruned.model, data, tokenizer=pruned.tokenizer)["bits_per_byte"]
    print("held-out bits/byte at FFN 75%:", nll)
    assert nll["common-act2"] < nll["random"] and nll["common-act2"] < nll["magnitude"], nll


def test_a_file_that_is_not_gguf_is_a_one_line_error(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"GGUF but not really" * 10)
    rc, err = _run(["prune", bogus, "--out", tmp_path / "out", "--vocab-keep", 10])
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "model.gguf" in err, err
    assert "cannot read this GGUF file" in err or "needs the gguf and accelerate packages" in err, err
    assert not (tmp_path / "out").exists()


def test_pruned_smollm2_as_gguf_reads_back_with_the_same_logits_and_ids(pruned, smol):
    """The tier's pruned SmolLM2 exported as GGUF (F16; the pre-tokenizer named as SmolLM2's own GGUF names it)
    loads with transformers' GGUF reader: logits equal the checkpoint's with its matrices rounded as F16 stores
    them, and 40 held-out paragraphs encode to the same ids. (Q8_0 is tests/test_export.py's, on a tiny model:
    its rounding runs in numpy, seconds at this size.)"""
    pytest.importorskip("gguf")
    from test_export import check_roundtrip, metadata

    from compact import export

    rc, err = _run(["export", pruned, "--gguf", "f16", "--gguf-pre", "smollm", "--quiet"])
    assert rc == 0, err
    paragraphs = [p for p in smol[2].read_text(encoding="utf-8").split("\n\n") if p.strip()][:40]
    check_roundtrip(pruned, "f16", paragraphs)
    meta = metadata(export.gguf_path(pruned, "f16"))
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["llama.feed_forward_length"] == 1152
    assert meta["llama.vocab_size"] == len(json.loads((pruned / "compact_report.json").read_text())["kept_token_ids"])


def test_a_gguf_source_names_its_tokenizer_for_the_export():
    """What a prune of the GGUF itself records in compact_report.json (`gguf_tokenizer`), from the file's metadata."""
    pytest.importorskip("gguf")
    try:
        path = real_model.gguf_path()
    except real_model.Unavailable as e:
        pytest.skip(str(e))
    assert loading._gguf_tokenizer(path) == {"model": "gpt2", "pre": "smollm"}


def test_the_readme_python_example_writes_the_cli_prune_tensor_for_tensor(pruned, smol, tmp_path):
    """The README's in-memory example, run as written (paths swapped for this machine's), against `compact
    prune` with the same options (the `pruned` fixture): every tensor equal, the cut tokenizer's vocabulary too."""
    import re
    from pathlib import Path

    from safetensors.torch import load_file

    folder, calib, _ = smol
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "compact.apply(" in b)
    for name, path in (("smollm2-135m", folder), ("first_half.txt", calib), ("smollm2-pruned", tmp_path / "api")):
        block = block.replace(f'"{name}"', repr(str(path)))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(block, "README.md", "exec"), {})
    ours, theirs = load_file(str(tmp_path / "api" / "model.safetensors")), load_file(str(pruned / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (tmp_path / "api", pruned)]
    assert vocab[0] == vocab[1]
