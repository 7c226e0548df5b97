"""The CLI on the real stories260K model: scores vs a hook reference, pruning quality, errors that write nothing."""
import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compact import cli
from compact.llama2c import load_llama2c
from compact.pruning import cut


def hook_reference(model, ids, kept=None):
    """Forward pre-hooks on every down_proj during a full forward (logits included), float64."""
    weights = (torch.ones(ids.shape, dtype=torch.float64, device=ids.device) if kept is None
               else torch.isin(ids, torch.tensor(kept, device=ids.device)).double())
    scores = {}

    def hook(name):
        def fn(module, args):
            scores[name] = scores.get(name, 0) + (args[0].double() ** 2 * weights[..., None]).sum((0, 1))
        return fn

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(f"model.layers.{i}.mlp"))
               for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return scores


@pytest.mark.parametrize("vocab_keep", [None, 300])
def test_score_matches_hook_reference(stories, tmp_path, vocab_keep, compute):
    """The scores equal forward pre-hooks on the same model in the same dtype and device (float64 sums of the
    same h: only the order of the float32 partial sums differs)."""
    ckpt, calib, _ = stories
    out = tmp_path / "scores.safetensors"
    args = ["score", str(ckpt), "--calib", str(calib), "--out", str(out), "--batch-size", "4", "--quiet", "--check",
            "--vocab-order", "id", *compute.args]
    assert cli.main(args + (["--vocab-keep", str(vocab_keep)] if vocab_keep else [])) == 0
    got = load_file(str(out))
    kept = list(range(vocab_keep)) if vocab_keep else None
    model = load_llama2c(ckpt).to(compute.device, compute.torch_dtype)
    expected = hook_reference(model, torch.from_numpy(np.load(calib)).to(compute.device), kept)
    assert sorted(got) == sorted(expected) and len(got) == 5
    for name, ref in expected.items():
        assert got[name].dtype == torch.float64 and got[name].shape == (172,)
        ref = ref.cpu()
        rel = ((got[name] - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        assert rel < 1e-4, f"{name}: relative difference {rel:.3g}"
    if vocab_keep:  # rare tokens really are left out
        full = {k: v.cpu() for k, v in hook_reference(model, torch.from_numpy(np.load(calib)).to(compute.device)).items()}
        assert all((got[n] < full[n]).any() for n in got)


def test_common_act2_beats_random_channels_on_heldout_nll(stories, tmp_path):
    ckpt, calib, heldout = stories
    assert cli.main(["prune", str(ckpt), "--out", str(tmp_path / "act2"), "--ffn-keep", "128",
                     "--calib", str(calib), "--quiet"]) == 0
    from compact import evaluate, loading, slicing

    ids = torch.from_numpy(np.load(heldout))
    pruned = loading.load(str(tmp_path / "act2"), dtype="float32", device="cpu").model
    act2, n = evaluate.nll(pruned, ids, batch_size=6, progress=False)
    gen = torch.Generator().manual_seed(0)
    for trial in range(3):
        model = load_llama2c(ckpt)
        slicing.slice_model(model, kept_channels={
            f"model.layers.{i}.mlp": sorted(torch.randperm(172, generator=gen)[:128].tolist()) for i in range(5)})
        rand, _ = evaluate.nll(model, ids, batch_size=6, progress=False)
        assert act2 / n < rand / n, f"random trial {trial}: NLL {rand / n:.4f} <= common act^2 {act2 / n:.4f}"


def test_prune_report_and_slices(stories, tmp_path, compute):
    ckpt, calib, _ = stories
    out = tmp_path / "both"
    assert cli.main(["prune", str(ckpt), "--out", str(out), "--vocab-keep", "400", "--ffn-keep", "0.75",
                     "--ffn-multiple", "16", "--calib", str(calib), "--vocab-order", "id", "--refit", "none",
                     "--quiet", *compute.args]) == 0
    import json

    from transformers import AutoModelForCausalLM

    report = json.loads((out / "compact_report.json").read_text())
    assert report["kept_token_ids"] == list(range(400))
    assert report["sizes"]["intermediate_after"] == 128  # 0.75 * 172 = 129 -> multiple of 16
    assert set(report["parameters"]["before"]) == {"embedding", "head", "attention", "ffn", "other", "total"}
    assert report["parameters"]["after"]["total"] < report["parameters"]["before"]["total"]
    pruned = AutoModelForCausalLM.from_pretrained(out)
    original = load_llama2c(ckpt).to(compute.torch_dtype)  # --dtype is what the prune writes
    assert pruned.dtype == compute.torch_dtype
    assert torch.equal(pruned.model.embed_tokens.weight, original.model.embed_tokens.weight[:400])
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    scores = load_file(str(out / "compact_scores.safetensors"))
    for i, kept in enumerate(report["kept_channels"]):
        mlp, ref = pruned.model.layers[i].mlp, original.model.layers[i].mlp
        top = torch.sort(scores[f"model.layers.{i}.mlp"], descending=True, stable=True).indices[:128]
        assert kept == sorted(top.tolist())
        assert torch.equal(mlp.gate_proj.weight, ref.gate_proj.weight[kept])
        assert torch.equal(mlp.up_proj.weight, ref.up_proj.weight[kept])
        assert torch.equal(mlp.down_proj.weight, ref.down_proj.weight[:, kept])
    generated = pruned.generate(torch.ones(1, 1, dtype=torch.long), max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 9) and int(generated.max()) < 400


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["missing model", "ffn-keep 0", "vocab-keep too large", "existing out",
                                  "ffn-keep too large", "no calibration"])
def test_errors_are_one_line_and_write_nothing(stories, tmp_path, case):
    ckpt, calib, _ = stories
    before = _digest(ckpt)
    out = tmp_path / "out"
    args = {
        "missing model": ["prune", str(tmp_path / "nope"), "--out", str(out), "--ffn-keep", "64", "--calib", str(calib)],
        "ffn-keep 0": ["prune", str(ckpt), "--out", str(out), "--ffn-keep", "0", "--calib", str(calib)],
        "vocab-keep too large": ["prune", str(ckpt), "--out", str(out), "--vocab-keep", "513"],
        "existing out": ["prune", str(ckpt), "--out", str(out), "--vocab-keep", "300"],
        "ffn-keep too large": ["prune", str(ckpt), "--out", str(out), "--ffn-keep", "173", "--calib", str(calib)],
        "no calibration": ["prune", str(ckpt), "--out", str(out), "--ffn-keep", "64"],
    }[case]
    if case == "existing out":
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    result = subprocess.run([sys.executable, "-m", "compact", *args], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "error:" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if case == "existing out" else [])
    if case == "existing out":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert _digest(ckpt) == before


def test_crash_while_saving_leaves_nothing(stories, tmp_path, monkeypatch):
    ckpt, _, _ = stories

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cut, "save_tokenizer", boom)
    assert cli.main(["prune", str(ckpt), "--out", str(tmp_path / "out"), "--vocab-keep", "300", "--quiet"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_with_flag(stories, tmp_path):
    ckpt, _, _ = stories
    out = tmp_path / "out"
    assert cli.main(["prune", str(ckpt), "--out", str(out), "--vocab-keep", "300", "--quiet"]) == 0
    assert cli.main(["prune", str(ckpt), "--out", str(out), "--vocab-keep", "200", "--quiet", "--overwrite"]) == 0
    import json

    assert len(json.loads((out / "compact_report.json").read_text())["kept_token_ids"]) == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_eval_on_pruned_vocabulary_renumbers_token_ids(stories, tmp_path, capsys):
    ckpt, calib, heldout = stories
    out = tmp_path / "v"
    assert cli.main(["prune", str(ckpt), "--out", str(out), "--vocab-keep", "511", "--quiet"]) == 0
    ids = np.load(heldout)
    kept_only = tmp_path / "kept.npy"
    np.save(kept_only, np.where(ids == 511, 5, ids))
    assert cli.main(["eval", str(ckpt), "--data", str(kept_only), "--quiet"]) == 0
    before = capsys.readouterr().out
    assert cli.main(["eval", str(out), "--data", str(kept_only), "--quiet"]) == 0
    after = capsys.readouterr().out
    nll = [float(next(line.split()[-1] for line in text.splitlines() if line.startswith("NLL"))) for text in (before, after)]
    # Same logits for kept tokens; the softmax loses one class's mass, so NLL can only drop, slightly.
    assert nll[1] <= nll[0] and nll[1] == pytest.approx(nll[0], rel=1e-3)
    assert (ids == 511).any(), "the held-out data should hold the dropped id 511 (test too weak)"
    assert cli.main(["eval", str(out), "--data", str(heldout), "--quiet"]) == 2


def test_eval_compare_marks_the_model_it_cannot_evaluate(stories, tmp_path, capsys, compute):
    """Three models, one whose vocabulary dropped an id the data holds: one table, three columns, exit 1."""
    ckpt, _, heldout = stories
    vocab, ffn = tmp_path / "vocab", tmp_path / "ffn"
    assert cli.main(["prune", str(ckpt), "--out", str(vocab), "--vocab-keep", "400", "--quiet", *compute.args]) == 0
    assert cli.main(["prune", str(ckpt), "--out", str(ffn), "--ffn-keep", "128", "--calib", str(heldout),
                     "--quiet", *compute.args]) == 0
    capsys.readouterr()
    code = cli.main(["eval", str(ckpt), "--compare", str(vocab), str(ffn), "--data", str(heldout), "--samples", "2",
                     "--speed", "--quiet", *compute.args])
    table = capsys.readouterr().out
    assert code == 1, table
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    header = table.splitlines()[1]
    assert all(str(m) in header for m in (ckpt, vocab, ffn)), table
    status = lines["status"]
    assert status.count(" ok") == 2 and "not evaluated:" in status and "dropped" in status, status
    nll = lines["NLL / token (nats)"].split()[-3:]
    assert nll[1] == "-" and nll[0] != "-" and nll[2] != "-", nll
    assert "weights" in lines and "median of 5" in table, table
    weights = [float(v) for v in lines["weights"].replace("MiB", "").split()[1:] if v != "-"]
    assert weights[1] < weights[0], f"the FFN-pruned model's weights should be smaller: {weights}"
    # Nothing usable at all: one line, exit 2.
    assert cli.main(["eval", str(vocab), "--compare", str(vocab), "--data", str(heldout), "--quiet"]) == 2


def test_version_and_help():
    result = subprocess.run([sys.executable, "-m", "compact", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("compact ")
    bad = subprocess.run([sys.executable, "-m", "compact", "prune"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_cgroup_cpu_quota_caps_threads(tmp_path):
    """A container's CPU quota (cgroup v2 or v1) is read; unlimited or absent means no cap."""
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cli._cgroup_cpus(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cli._cgroup_cpus(v2) is None
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cli._cgroup_cpus(v1) == 2
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cli._cgroup_cpus(v1) is None
    assert cli._cgroup_cpus(none) is None


def _subcommands() -> dict:
    parser = cli._parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# command -> the arguments it requires; the flag under test is added to these
_BASE = {"score": ["m", "--out", "o.safetensors", "--calib", "c.bin"], "prune": ["m", "--out", "o"],
         "plan": ["m", "--calib", "c.bin", "--target-params", "0.5"], "eval": ["m", "--data", "c.bin"]}
_SAMPLES = {"--target-params": "0.4", "--ffn-keep": "0.5", "--tokenizer": "t", "--scores": "s.safetensors",
            "--vocab-always": "a.txt", "--gguf-pre": "llama-bpe", "--calib": "d.bin", "--data": "d.bin",
            "--out": "p", "--device": "cpu"}


@pytest.mark.parametrize("command", list(_BASE))
def test_every_flag_reaches_an_option(command):
    """Each flag of score, prune, plan and eval is in cli.FLAGS, and a non-default value given on the command
    line arrives in its option group's field (a renamed flag or field fails here, instead of being dropped)."""
    local = {"eval": {"compare", "speed", "tasks", "limit"}}.get(command, set())  # eval's own: not options of a prune
    for action in _subcommands()[command]._actions:
        if action.dest in ("help", *local) or not action.option_strings:
            continue
        assert action.dest in cli.FLAGS, f"{command} {action.option_strings[0]} reaches no option"
        flag = action.option_strings[0]
        if action.nargs == 0:
            value = []
        elif action.choices:
            value = [next(c for c in reversed(list(action.choices)) if c != action.default)]
        else:
            value = [_SAMPLES.get(flag, "3")]
        args = cli._parser().parse_args([command, *_BASE[command], flag, *value])  # the last given wins
        group, field, *convert = cli.FLAGS[action.dest]
        given = getattr(args, action.dest)
        expected = convert[0](given) if convert else given
        default = getattr(cli._groups(cli._parser().parse_args([command, *_BASE[command]]))[group], field)
        assert getattr(cli._groups(args)[group], field) == expected != default, (command, flag)


def test_the_resume_signature_is_the_method_and_the_calibration(tmp_path):
    """Run and output options (--quiet, --overwrite, --check, --gguf) leave the signature alone; a method or
    calibration option changes it."""
    from compact.options import signature

    def sig(*extra):
        g = cli._groups(cli._parser().parse_args(["prune", "m", "--out", "o", "--ffn-keep", "0.5", *extra]))
        return signature(g["method"], g["calib"], "m", "float32")

    base = sig("--calib", "c.txt")
    assert set(base) == {"method", "calibration", "model", "model files", "dtype"}
    assert sig("--calib", "c.txt", "--quiet", "--overwrite", "--check", "--gguf", "--batch-size", "4") == base
    assert sig("--calib", "c.txt", "--seed", "3") != base and sig("--calib", "c.txt", "--samples", "8") != base


@pytest.mark.parametrize("flags,words", [
    (["--ffn-keep", "1.5"], "as a ratio must be in (0, 1]"),
    (["--target-params", "0.6"], "--target-params needs calibration data"),
    (["--ffn-keep", "0.5", "--refit", "sequential"], "--refit sequential needs calibration data"),
    (["--vocab-keep", "50", "--vocab-order", "frequency"], "--vocab-order frequency needs calibration data"),
    (["--ffn-keep", "0.5", "--ffn-criterion", "act2"], "--ffn-criterion act2 needs calibration data"),
    (["--ffn-keep", "0.5", "--ffn-select", "obs", "--ffn-criterion", "random"], "a data-driven --ffn-criterion"),
    (["--ffn-keep", "0.5", "--scores", "s.safetensors", "--refit", "sequential"], "a data-driven --ffn-criterion"),
    (["--ffn-keep", "0.5", "--ffn-criterion", "random", "--vocab-always", "a.txt"], "--vocab-always keeps tokens"),
    (["--ffn-keep", "0.5", "--ffn-criterion", "random", "--seed", str(2**70)], "--seed: must be an integer"),
    (["--ffn-keep", "0.5", "--scores", "s.safetensors", "--ffn-criterion", "wanda"],
     "--ffn-criterion wanda would be ignored"),
    (["--ffn-keep", "0.5", "--calib", "c.txt", "--calib-dtype", "uint16"], "--calib-dtype gives the id width"),
])
def test_errors_that_follow_from_the_flags_come_before_the_model_is_read(flags, words, tmp_path, capsys):
    """The model's weights file is damaged: an error about the flags proves no weight was read first (a parse
    error is argparse's exit 2)."""
    import tiny_models

    tiny_models.config("llama").save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    (tmp_path / "c.txt").write_text("calibration text")
    try:
        code = cli.main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "out"), *flags])
    except SystemExit as e:
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert words in err and "safetensors" not in err.replace("s.safetensors", "") and err.count("\n") == 1, err


def test_python_options_are_typed():
    """In Python a count is an int and a ratio a float: 1.5 channels or a seed of "a" are refused by name."""
    from compact.options import Method

    assert Method(ffn_keep=1).ffn_keep == 1 and Method(ffn_keep=1.0).ffn_keep == 1.0
    for kwargs, flag in (({"ffn_keep": 1.5}, "--ffn-keep"), ({"seed": "a"}, "--seed"),
                         ({"target_params": "0.5"}, "--target-params"), ({"target_params": True}, "--target-params")):
        with pytest.raises(ValueError, match=flag):
            Method(**kwargs)


@pytest.mark.parametrize("flags", [["--refit", "none", "--ffn-repair"], ["--ffn-repair", "--refit", "sequential"]])
def test_ffn_repair_and_another_refit_are_refused(flags, capsys):
    """--ffn-repair is --refit same-input: beside another --refit it is a contradiction, not a silent last-wins."""
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["prune", "m", "--out", "o", "--ffn-keep", "0.5", *flags])
    assert exit_.value.code == 2 and "ask for different re-fits" in capsys.readouterr().err
    agreed = cli._parser().parse_args(["prune", "m", "--out", "o", "--refit", "same-input", "--ffn-repair"])
    assert agreed.refit == "same-input"


def test_resume_without_a_checkpoint_says_it_starts_from_the_beginning(tmp_path):
    import numpy as np

    import tiny_models

    tiny_models.build("llama").save_pretrained(tmp_path / "model")
    np.save(tmp_path / "c.npy", (np.arange(4 * 16).reshape(4, 16) * 7) % tiny_models.VOCAB)
    with pytest.warns(UserWarning, match=r"--resume: .*out\.ckpt holds no checkpoint; the run starts from the beg"):
        assert cli.main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--ffn-keep", "24ch",
                         "--calib", str(tmp_path / "c.npy"), "--resume"]) == 0


def _project() -> dict:
    """pyproject.toml's [project] table."""
    import tomllib

    return tomllib.loads((Path(cli.__file__).parents[1] / "pyproject.toml").read_text())["project"]


def _distribution() -> str:
    """The distribution's name (what `pip install` takes)."""
    return _project()["name"]


def test_install_hints_name_the_distribution():
    """`compact` on PyPI is another package: every install hint, in the sources and the help, names this one."""
    root = Path(cli.__file__).parents[1]
    sources = [p for folder in ("compact", "compact_kernels") for p in (root / folder).rglob("*.py")]
    texts = {str(p): p.read_text(encoding="utf-8") for p in sources}
    texts.update({f"compact {name} --help": sub.format_help() for name, sub in _subcommands().items()})
    wrong = [where for where, text in texts.items() if "compact[" in text]
    assert not wrong, f"install hints that name another package: {wrong}"
    assert f"pipinstall'{_distribution()}[gguf]'" in "".join(texts["compact prune --help"].split())  # as wrapped


def test_the_quick_start_installs_gguf_support():
    """`make demo` installs the gguf extra, so a .gguf model prunes right after it; the extra holds what
    transformers' GGUF loading imports: gguf (the file) and accelerate (from_pretrained with gguf_file needs it)."""
    import re

    makefile = (Path(cli.__file__).parents[1] / "Makefile").read_text()
    recipe = makefile.split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert '-e ".[gguf]"' in recipe, recipe
    assert {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0] for r in _project()["optional-dependencies"]["gguf"]} >= {
        "gguf", "accelerate"}


def _help(action) -> str:
    return " ".join((action.help or "").split())


def test_the_help_says_what_the_code_does():
    """MODEL takes a .gguf file; every numeric default is in its help as `default N`; --dtype is the one text."""
    from compact.options import DTYPE_HELP

    for name, sub in _subcommands().items():
        for action in sub._actions:
            if action.dest == "model" and name != "export":
                assert ".gguf file" in _help(action), f"compact {name} MODEL: {action.help}"
            if type(action.default) in (int, float):
                assert f"default {action.default}" in _help(action), f"compact {name} {action.option_strings}"
            if action.dest == "dtype" and name != "check":
                assert action.help == DTYPE_HELP, f"compact {name} --dtype"


@pytest.mark.parametrize("storage, device, compute", [
    (torch.bfloat16, "cpu", torch.float32), (torch.float16, "cpu", torch.float32), (torch.bfloat16, "cuda", torch.bfloat16),
    (torch.float32, "cuda", torch.float32), (None, "cpu", torch.float32), (None, "cuda", torch.bfloat16)])
def test_dtype_auto_resolves_as_its_help_says(storage, device, compute):
    """--dtype auto: a folder computes in its stored dtype (float32 on a CPU for 16-bit) and writes that stored
    dtype; a file without one (storage None: .gguf, llama2.c) computes and writes bfloat16 on a GPU, float32 on a
    CPU -- as options.DTYPE_HELP says."""
    from compact.loading import _output, resolve_dtype

    assert resolve_dtype("auto", device, storage) == compute
    assert (_output("auto", storage) or compute) == (storage or compute)


def test_a_bad_value_is_refused_in_plain_words_naming_its_flag(capsys):
    """No converter's Python name (`invalid _count value`, `invalid int value`) reaches the user: each option that
    converts its text says what it must be, after the flag's name."""
    for name, sub in _subcommands().items():
        for action in sub._actions:
            if action.type in (None, Path) or not action.option_strings:
                continue
            flag = action.option_strings[0]
            with pytest.raises(SystemExit):
                cli._parser().parse_args([name, *_BASE.get(name, ["m"]), flag, "x!"])
            err = capsys.readouterr().err
            assert f"argument {flag}: must" in err and "invalid" not in err, err


def test_vocab_keep_takes_a_ratio_as_ffn_keep_does(capsys):
    """--vocab-keep 0.5 is a ratio (of the regular tokens: test_api), 24576 a count; a bare 1 is ambiguous, as for
    --ffn-keep."""
    def method(*flags):
        return cli._groups(cli._parser().parse_args(["prune", "m", "--out", "o", *flags]))["method"]

    assert method("--vocab-keep", "0.5").vocab_keep == "0.5" and method("--vocab-keep", "24576").vocab_keep == "24576"
    for flag, unit in (("--vocab-keep", "1tok"), ("--ffn-keep", "1ch")):
        assert getattr(method(flag, unit), flag[2:].replace("-", "_")) == unit
        with pytest.raises(SystemExit):
            method(flag, "1")
        assert f"argument {flag}: 1 is ambiguous: write {unit}" in capsys.readouterr().err


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """(a tiny Llama written as a Q8_0 .gguf, calibration text)."""
    pytest.importorskip("gguf")
    import tiny_models

    from compact import export

    root = tmp_path_factory.mktemp("q8")
    folder, calib = tiny_models.byte_level_llama(root)
    return export.export(folder, "q8_0", root / "tiny-q8_0.gguf"), calib


def test_the_prune_summary_says_what_it_measured(q8_gguf, tmp_path, capsys):
    """The planner's losses are said in words and percent, its vocabulary in the rows the line above counts, the
    timings include loading, and an output wider than the source (Q8_0 written as float32) is one note naming
    --dtype."""
    import json

    import gguf

    path, calib = q8_gguf
    out = tmp_path / "out"
    assert cli.main(["prune", str(path), "--out", str(out), "--target-params", "0.7", "--ffn-multiple", "16",
                     "--calib", str(calib), "--samples", "2", "--seq-len", "32", "--refit", "none"]) == 0
    printed, report = capsys.readouterr().out, json.loads((out / "compact_report.json").read_text())
    chosen = next(c for c in report["plan"]["candidates"] if c["chosen"])
    assert "token loss" not in printed and "score loss" not in printed, printed
    dropped = (f"calibration tokens the cut vocabulary drops (spelled with kept tokens instead): "
               f"{chosen['token_loss']:.2%} ({chosen['cross_fitted_loss']:.2%} cross-fitted")
    assert dropped in printed, printed
    rows = report["sizes"]["vocab_after"]
    assert f"-> {rows:,} tokens (embedding rows, special tokens included)" in printed
    assert f"--vocab-keep {chosen['vocab_keep']:,} regular tokens ({rows:,} rows with the special tokens)" in printed
    assert next(iter(report["timings_s"])) == "loading" and "timings: loading " in printed
    tensors = gguf.GGUFReader(str(path)).tensors  # the mean bits per weight: block scales included
    bits = 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)
    assert report["dtype"] == {"compute": "float32", "output": "float32", "source": "GGUF Q8_0",
                               "source_bits_per_weight": round(bits, 3)}
    notes, bits = [line for line in printed.splitlines() if line.startswith("note: ")], round(bits, 3)  # as reported
    note = (f"note: the weights are written as float32, {32 / bits:.1f}x the {bits:.1f} bits per weight the source "
            "stores (GGUF Q8_0): --dtype bfloat16 writes 16 bits (and computes in bfloat16)")
    assert notes == [note], notes


def test_the_model_card_lists_every_file_written(q8_gguf, tmp_path, monkeypatch):
    """The pruned folder's README.md names each file the folder holds, the GGUF that --gguf writes after the
    checkpoint and `compact export` adds later too (a card someone edited is left alone); it never says Python's
    None; the report names the source by its absolute path, from a relative MODEL."""
    import json

    path, calib = q8_gguf
    monkeypatch.chdir(path.parent)
    out = tmp_path / "out"
    assert cli.main(["prune", path.name, "--out", str(out), "--ffn-keep", "0.5", "--calib", str(calib),
                     "--samples", "2", "--seq-len", "32", "--gguf", "--quiet"]) == 0
    report = json.loads((out / "compact_report.json").read_text())
    assert report["source"] == str(path.resolve())

    def listed() -> set[str]:
        card = (out / "README.md").read_text()
        assert "None" not in card, card
        return {line.split("`")[1] for line in card.split("## Files\n\n")[1].splitlines() if line.startswith("- `")}

    written = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert "model-f16.gguf" in written and "compact_scores.safetensors" in written and listed() == written
    assert cli.main(["export", str(out), "--gguf", "q8_0", "--quiet"]) == 0
    assert listed() == written | {"model-q8_0.gguf"}
    (out / "README.md").write_text("my own notes\n")
    assert cli.main(["export", str(out), "--gguf", "f32", "--quiet"]) == 0
    assert (out / "README.md").read_text() == "my own notes\n"


def test_eval_columns_are_short_labels_with_a_legend():
    """`compact eval`'s columns are headed by folder or file names (the shortest distinct tail where two share
    one), with one legend line for the paths shortened; no legend when nothing was."""
    from compact import tables

    sources = ["/data/runs/a/model", "/data/runs/b/model", "/models/SmolLM2-135M-Instruct.Q4_1.gguf", "pruned"]
    text = tables.eval_table({s: {"error": "x"} for s in sources}, "held.txt").splitlines()
    assert text[1] == ("models: a/model = /data/runs/a/model; b/model = /data/runs/b/model; "
                       "SmolLM2-135M-Instruct.Q4_1.gguf = /models/SmolLM2-135M-Instruct.Q4_1.gguf; pruned = pruned")
    assert text[2].split() == ["metric", "a/model", "b/model", "SmolLM2-135M-Instruct.Q4_1.gguf", "pruned"]
    assert tables.eval_table({"pruned": {"error": "x"}}, "held.txt").splitlines()[1].split() == ["metric", "pruned"]


def test_eval_scores_rows_of_the_vocabulary(monkeypatch):
    """The NLL's softmax runs over contiguous [positions, V] rows (a transposed [B, V, T] input was ~8x slower on
    a CPU and less exact), and the total agrees with float64 within float32 rounding of a V-term log-sum-exp:
    (log2 V + 4) ulps of each token's loss."""
    import math
    from types import SimpleNamespace

    import torch.nn.functional as F

    from compact import evaluate

    V, T = 4099, 33
    gen = torch.Generator().manual_seed(0)
    logits, ids = 3 * torch.randn(2, T, V, generator=gen), torch.randint(0, V, (2, T), generator=gen)

    class Fixed(torch.nn.Module):  # a "model" whose logits are given
        def get_input_embeddings(self):
            return torch.nn.Embedding(1, 1)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return SimpleNamespace(logits=logits[:input_ids.shape[0]])

    shapes, cross_entropy = [], F.cross_entropy

    def spy(input, target, **kwargs):
        shapes.append((input.dim(), input.stride(-1)))
        return cross_entropy(input, target, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    total, count = evaluate.nll(Fixed(), ids, batch_size=2, progress=False)
    assert shapes == [(2, 1)], shapes
    exact = cross_entropy(logits[:, :-1].double().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    assert count == 2 * (T - 1)
    bound = (math.log2(V) + 4) * torch.finfo(torch.float32).eps * float(exact.abs().sum())
    assert abs(total - float(exact.sum())) <= bound, (total, float(exact.sum()), bound)


def test_a_gguf_is_parsed_once_per_load(q8_gguf, monkeypatch):
    """transformers reads a GGUF's header for the config (twice), the tokenizer and the weights, and compact for its
    metadata: one parse serves them all (SmolLM2's 49,152 tokens cost ~3 s a parse)."""
    import gguf

    from compact import loading

    parses, parse = [], gguf.GGUFReader

    def counted(*args, **kwargs):
        parses.append(args[0])
        return parse(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counted)
    loaded = loading.load(str(q8_gguf[0]), device="cpu")
    assert len(parses) == 1 and loaded.storage.name == "GGUF Q8_0", parses
