"""Selection rules, safe output writing, scores files and id renumbering."""
import pytest
import torch

from compact import output, pruning, selection


def test_top_channels_ties_to_lower_index_ascending():
    scores = torch.tensor([1.0, 3.0, 3.0, 0.5, 3.0, 2.0], dtype=torch.float64)
    assert selection.top_channels(scores, 2) == [1, 2]
    assert selection.top_channels(scores, 4) == [1, 2, 4, 5]
    assert selection.top_channels(scores, 6) == list(range(6))
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        selection.top_channels(scores, 7)


@pytest.mark.parametrize("value,expected", [("128", 128), (100, 100), ("0.5", 2432), ("1ch", 1), ("128ch", 128),
                                            (1, 1), ("1.0", 4864), (1.0, 4864), ("0.001", 64)])
def test_resolve_ffn_keep(value, expected):
    assert selection.resolve_ffn_keep(value, 4864, 64) == expected


@pytest.mark.parametrize("value,multiple,message", [
    ("0", 64, "between 1 and"), ("4865", 64, "between 1 and"), ("1.5", 64, r"in \(0, 1\]"),
    ("-0.5", 64, r"in \(0, 1\]"), ("abc", 64, "channel count"), ("1", 64, "ambiguous: write 1ch"),
    ("+1", 64, "ambiguous"), ("0.5ch", 64, "channel count"), ("ch", 64, "channel count"),
    ("0.5", 8000, "cannot be rounded to a multiple of --ffn-multiple 8000")])
def test_resolve_ffn_keep_errors(value, multiple, message):
    with pytest.raises(ValueError, match=message):
        selection.resolve_ffn_keep(value, 4864, multiple)


def test_staged_dir_is_atomic(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output.staged_dir(out, overwrite=False) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with output.staged_dir(out, overwrite=False) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with output.staged_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [output.MARKER, "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_destination(tmp_path):
    output.check_destination(tmp_path / "new", overwrite=False)
    (tmp_path / "empty").mkdir()
    output.check_destination(tmp_path / "empty", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        output.check_destination(tmp_path / "full", overwrite=False)
    with pytest.raises(ValueError, match="was not written by compact"):
        output.check_destination(tmp_path / "full", overwrite=True)
    (tmp_path / "full" / output.MARKER).write_text("")
    output.check_destination(tmp_path / "full", overwrite=True)
    with pytest.raises(ValueError, match="overlaps the source model"):
        output.check_destination(tmp_path / "full" / "sub", overwrite=True, protected=tmp_path / "full")
    with pytest.raises(ValueError, match="overlaps the source model"):
        output.check_destination(tmp_path, overwrite=True, protected=tmp_path / "full")


def test_scores_file_round_trip_and_validation(tmp_path):
    scores = {f"model.layers.{i}.mlp": torch.rand(8, dtype=torch.float64) for i in range(3)}
    path = tmp_path / "s.safetensors"
    output.save_scores(scores, path, {"note": "x"})
    loaded = output.load_scores(path, {name: 8 for name in scores})
    assert all(torch.equal(loaded[n], scores[n]) for n in scores)
    with pytest.raises(ValueError, match="exists and is not empty"):
        output.save_scores(scores, path)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp has shape \(8,\), the model needs \(9,\)"):
        output.load_scores(path, {name: 9 for name in scores})
    with pytest.raises(ValueError, match="lacks model.layers.3.mlp"):
        output.load_scores(path, {f"model.layers.{i}.mlp": 8 for i in range(4)})
    with pytest.raises(FileNotFoundError):
        output.load_scores(tmp_path / "none.safetensors", {})
    with pytest.raises(ValueError, match="has 3 layers, the model 2"):
        output.load_scores(path, {f"model.layers.{i}.mlp": 8 for i in range(2)})
    tagged = tmp_path / "tagged.safetensors"
    output.save_scores(scores, tagged, {"model_hidden_size": "64"})
    with pytest.raises(ValueError, match="computed for a model with model_hidden_size 64, this one has 128"):
        output.load_scores(tagged, {name: 8 for name in scores}, {"model_hidden_size": "128"})
    assert output.load_scores(tagged, {name: 8 for name in scores}, {"model_hidden_size": "64"}).keys() == scores.keys()


def test_renumber_ids():
    ids = torch.tensor([[0, 5, 7, 3]])
    assert pruning.renumber(ids, None, [0, 3, 5, 7], 8, "x").tolist() == [[0, 2, 3, 1]]
    with pytest.raises(ValueError, match="holds token id 6, which this pruned model's vocabulary dropped"):
        pruning.renumber(torch.tensor([[6, 0]]), None, [0, 3], 8, "x")
    mask = torch.tensor([[1, 0]])
    assert pruning.renumber(torch.tensor([[3, 6]]), mask, [0, 3], 8, "x").tolist() == [[1, 0]]
