"""Several calibration sources (--calib A B, or a folder): rows shared out evenly and interleaved, token counts
weighed per source, every file in the resume signature, and one-line errors for what cannot be read."""
import json

import numpy as np
import pytest
import torch

import tiny_models
from compact import cli, loading
from compact.options import CalibOptions, Method, signature
from compact.pruning import calibrate, token_counts


def _npy(path, rows: int, length: int, start: int):
    np.save(path, (np.arange(rows * length).reshape(rows, length) + start) % tiny_models.VOCAB)
    return path


def test_a_folder_is_its_calibration_files_by_name_and_one_path_stays_a_string(tmp_path):
    for name in ("b.txt", "a.npy", "notes.md"):
        (tmp_path / name).write_text("x")
    assert CalibOptions([str(tmp_path)]).path == str(tmp_path)  # (argparse's list of one)
    assert CalibOptions(tmp_path).files() == (tmp_path / "a.npy", tmp_path / "b.txt")
    both = CalibOptions([str(tmp_path / "b.txt"), str(tmp_path)])
    assert both.path == (str(tmp_path / "b.txt"), str(tmp_path)) and len(both.files()) == 3
    with pytest.raises(FileNotFoundError, match="missing.txt: calibration file not found"):
        CalibOptions((str(tmp_path / "b.txt"), str(tmp_path / "missing.txt"))).files()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: a folder without calibration files"):
        CalibOptions(str(tmp_path / "empty")).files()


def test_rows_are_shared_out_and_interleaved(tmp_path):
    """5 rows of two sources: 3 of the first and 2 of the second, in turn; a shorter source's rows are padded and
    masked."""
    model = tiny_models.build("llama")
    loaded = loading.held(model)
    a, b = _npy(tmp_path / "a.npy", 8, 16, 0), _npy(tmp_path / "b.npy", 8, 12, 50)
    rows = calibrate(loaded, CalibOptions((str(a), str(b)), samples=5, seq_len=16))
    want_a, want_b = torch.from_numpy(np.load(a)), torch.from_numpy(np.load(b))
    assert rows.input_ids.shape == (5, 16)
    for row, (source, index) in enumerate([(want_a, 0), (want_b, 0), (want_a, 1), (want_b, 1), (want_a, 2)]):
        length = source.shape[1]
        assert torch.equal(rows.input_ids[row, :length], source[index]), row
        assert rows.attention_mask[row].tolist() == [1] * length + [0] * (16 - length), row
    assert "a.npy" in rows.source and "b.npy" in rows.source
    with pytest.raises(ValueError, match="--samples 1 is fewer than the 2 calibration sources"):
        calibrate(loaded, CalibOptions((str(a), str(b)), samples=1, seq_len=16))


def test_every_source_weighs_the_same_in_the_token_counts(tmp_path):
    """A long file of one token and a short file of another: counted per source and scaled to the mean total,
    the two tokens count alike (summed raw, the long file would decide the vocabulary alone)."""
    loaded = loading.held(tiny_models.build("llama"))
    np.save(tmp_path / "long.npy", np.full(1000, 7))
    np.save(tmp_path / "short.npy", np.full(10, 9))
    counts = token_counts(loaded, CalibOptions((str(tmp_path / "long.npy"), str(tmp_path / "short.npy"))))
    assert float(counts[7]) == float(counts[9]) == 505.0 and float(counts.sum()) == 1010.0
    one = token_counts(loaded, CalibOptions(str(tmp_path / "long.npy")))
    assert one.dtype == torch.int64 and int(one[7]) == 1000  # one source: the counts as they are


def test_a_folder_prunes_as_its_files_and_each_file_signs_a_resume(tmp_path, capsys):
    tiny_models.build("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "data").mkdir()
    a, b = _npy(tmp_path / "data" / "a.npy", 4, 16, 0), _npy(tmp_path / "data" / "b.npy", 4, 16, 40)
    reports = []
    for name, calib in (("folder", [str(tmp_path / "data")]), ("files", [str(a), str(b)])):
        assert cli.main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / name), "--ffn-keep", "24ch",
                         "--vocab-keep", "60", "--samples", "8", "--calib", *calib, "--quiet"]) == 0
        reports.append(json.loads((tmp_path / name / "compact_report.json").read_text()))
    assert reports[0]["kept_channels"] == reports[1]["kept_channels"]
    assert reports[0]["kept_token_ids"] == reports[1]["kept_token_ids"]
    stamps = signature(Method(), CalibOptions((str(a), str(b))), "m", "float32")["calibration"]["file"]
    assert "a.npy" in stamps and "b.npy" in stamps
    capsys.readouterr()  # (transformers' own progress bar of save_pretrained above)
    assert cli.main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "x"), "--ffn-keep", "24ch",
                     "--calib", str(a), str(tmp_path / "missing.npy")]) == 2
    err = capsys.readouterr().err
    assert "missing.npy: calibration file not found" in err and err.count("\n") == 1, err
