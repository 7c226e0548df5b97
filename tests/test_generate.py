"""`compact generate`: calibration text the model writes itself, reproducible from its seed, read back by
--calib as one document per sample; nothing replaced, one-line errors."""
import pytest

from compact import cli, data, demo, demo_text
from compact.options import CalibOptions


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer (BOS and EOS tokens, no BOS added to text)."""
    folder = tmp_path_factory.mktemp("generate") / "model"
    tokenizer = demo.train_tokenizer(demo_text.stories(200, seed=1))
    demo.build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_same_seed_writes_the_same_text_and_another_seed_other_text(model, tmp_path):
    written = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert cli.main(["generate", str(model), "--out", str(tmp_path / f"{name}.txt"), "--samples", "5",
                         "--seq-len", "24", "--seed", str(seed), "--batch-size", "2", "--quiet"]) == 0
        written[name] = (tmp_path / f"{name}.txt").read_text(encoding="utf-8")
    assert written["a"] == written["b"] != written["c"]
    assert written["a"].count("\f") == 4  # five documents


def test_the_text_calibrates(model, tmp_path):
    """Read back as --calib text: the tokenizer's ids, documents joined by EOS."""
    from transformers import AutoTokenizer

    out = tmp_path / "gen.txt"
    assert cli.main(["generate", str(model), "--out", str(out), "--samples", "4", "--seq-len", "32", "--quiet"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = data.load_calibration(CalibOptions(str(out), samples=16, seq_len=16), tokenizer=tokenizer,
                                 vocab_size=len(tokenizer))
    assert rows.input_ids.shape[1] == 16 and "from 4 document(s)" in rows.source


def test_nothing_is_replaced_and_errors_are_one_line(model, tmp_path, capsys):
    out = tmp_path / "kept.txt"
    out.write_text("my own text")
    assert cli.main(["generate", str(model), "--out", str(out), "--quiet"]) == 2
    assert out.read_text() == "my own text"
    with pytest.raises(SystemExit) as parse_error:  # (argparse's usage error)
        cli.main(["generate", str(model), "--out", str(tmp_path / "t.txt"), "--temperature", "0"])
    assert parse_error.value.code == 2
    assert cli.main(["generate", str(model), "--out", str(tmp_path / "no" / "t.txt"), "--samples", "1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--out" in err[0] and "exists" in err[0], err
    assert "argument --temperature: must be a positive number" in err[1], err
    assert "--out" in err[2] and "does not exist" in err[2], err
    assert not list(tmp_path.glob(".*partial")) and not (tmp_path / "t.txt").exists()


def test_an_out_in_a_missing_folder_is_refused_before_the_model_loads(tmp_path, capsys):
    """The flags alone decide it: the model path does not even exist, and the --out error comes first."""
    assert cli.main(["generate", str(tmp_path / "no-model"), "--out", str(tmp_path / "no" / "t.txt")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no-model" not in err and err.count("\n") == 1, err


def test_a_prune_mixes_in_the_text_the_model_writes_as_one_more_source(model, tmp_path, monkeypatch):
    """--calib-generate N: the same decision as the text `compact generate` writes (N samples, --seq-len tokens
    each, seed --seed), passed as one more --calib file; alone it is the calibration; its file does not outlive
    the prune, and the report records the option."""
    import json
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the prune's own file goes, and is removed
    text = tmp_path / "text.txt"
    text.write_text("\n".join(demo_text.stories(40, seed=3)), encoding="utf-8")
    assert cli.main(["generate", str(model), "--out", str(tmp_path / "gen.txt"), "--samples", "3", "--seq-len", "24",
                     "--seed", "5", "--batch-size", "8", "--quiet"]) == 0
    cut = ["--ffn-keep", "0.5", "--vocab-keep", "0.5", "--samples", "8", "--seq-len", "24", "--quiet"]
    runs = {"inside": ["--calib", str(text), "--calib-generate", "3", "--seed", "5"],
            "given": ["--calib", str(text), str(tmp_path / "gen.txt"), "--seed", "5"],
            "alone": ["--calib-generate", "3", "--seed", "5"]}
    reports = {}
    for name, flags in runs.items():
        assert cli.main(["prune", str(model), "--out", str(tmp_path / name), *cut, *flags]) == 0
        reports[name] = json.loads((tmp_path / name / "compact_report.json").read_text())
    inside, given, alone = reports["inside"], reports["given"], reports["alone"]
    assert inside["kept_channels"] == given["kept_channels"] and inside["kept_token_ids"] == given["kept_token_ids"]
    assert inside["options"]["calib_generate"] == 3 and "calibration text" in inside["timings_s"]
    assert alone["vocab_order"] == "frequency" and alone["calibration"].startswith("generated.txt: ")
    assert "from 3 document(s)" in alone["calibration"]
    assert alone["kept_channels"] != inside["kept_channels"]
    assert not list(tmp_path.glob("compact-generated-*"))


def test_calib_generate_errors_are_one_line(model, tmp_path, capsys):
    from tiny_models import build

    build("llama").save_pretrained(tmp_path / "bare")  # (no tokenizer)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["prune", str(model), "--out", str(tmp_path / "a"), "--ffn-keep", "0.5", "--calib-generate", "-1"])
    assert cli.main(["prune", str(model), "--out", str(tmp_path / "b"), "--ffn-keep", "0.5", "--calib-generate", "2",
                     "--offload", "layerwise", "--quiet"]) == 2
    assert cli.main(["prune", str(tmp_path / "bare"), "--out", str(tmp_path / "c"), "--ffn-keep", "24ch",
                     "--calib-generate", "2", "--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "--calib-generate" in line]
    assert len(err) == 3, err
    assert "must be an integer of at least 0" in err[0], err
    assert "--offload layerwise" in err[1] and "needs a tokenizer" in err[2], err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
