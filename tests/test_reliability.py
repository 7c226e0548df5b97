"""The CLI against careless and hostile use: bad models, bad data, bad options, dangerous --out paths,
signals, symlinks, concurrent runs, read-only and full disks.

Every failing case must: exit 2 (130 / 143 for SIGINT / SIGTERM), print exactly one line on stderr and no
traceback, leave no output or staging folder behind, and leave the source's bytes unchanged. Most cases run
`compact.cli.main` in-process (fast); signals run `python -m compact` in a child process.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compact import cli, output, selection

VOCAB, HIDDEN, FFN, LAYERS = 64, 16, 32, 2


def run(argv: list) -> tuple[int, str]:
    """cli.main in-process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, err.getvalue()


def digest(path: Path) -> str:
    """sha256 over every file under `path` (names and bytes)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + f.read_bytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Staging folders/files compact left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".compact."))


def assert_clean_failure(code: int, stderr: str, *, folder: Path, sources: list[Path], before: list[str],
                         absent: Path | None = None, want: int = 2, what: str = "") -> None:
    lines = stderr.strip().splitlines()
    assert code == want, f"{what}: exit {code}, wanted {want}: {stderr}"
    assert len(lines) == 1 and "Traceback" not in stderr, f"{what}: stderr is not one line: {stderr!r}"
    assert not leftovers(folder), f"{what}: staging left behind: {leftovers(folder)}"
    if absent is not None:
        assert not absent.exists(), f"{what}: {absent} was written"
    assert [digest(s) for s in sources] == before, f"{what}: the source changed"


def tiny_model(folder: Path, layers: int = LAYERS, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A working directory holding a tiny model `src`, calibration ids, and room for outputs."""
    monkeypatch.chdir(tmp_path)
    src = tiny_model(tmp_path / "src")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).integers(0, VOCAB, size=(4, 16)))
    return tmp_path, src


def prune_args(src, out, *extra):
    return ["prune", src, "--out", out, "--ffn-keep", "16", "--calib", "calib.npy", "--samples", "4",
            "--seq-len", "16", "--quiet", *extra]


# ------------------------------------------------------------------------------------------- bad models

def _drop_tensor(src: Path, name="model.layers.1.mlp.down_proj.weight") -> None:
    tensors = load_file(str(src / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _add_tensor(src: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def _truncate(src: Path) -> None:
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(src: Path) -> None:
    (src / "model.safetensors").write_bytes(b"not a safetensors file at all" * 10)


def _config_edit(**changes):
    def edit(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))
    return edit


def _pickle_weights(src: Path) -> None:
    """A pickle that would run code if unpickled without weights_only."""
    (src / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch EVIL_RAN",))

    torch.save({"x": Evil()}, src / "pytorch_model.bin", _use_new_zipfile_serialization=True)


BAD_MODELS = {
    "missing tensor": _drop_tensor,
    "unexpected tensor": _add_tensor,
    "truncated safetensors": _truncate,
    "garbage safetensors": _garbage,
    "intermediate_size disagrees": _config_edit(intermediate_size=FFN * 2),
    "unsupported model_type": _config_edit(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
    "custom code without --trust-remote-code": _config_edit(
        model_type="my_custom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                          "AutoModelForCausalLM": "modeling_x.X"}),
    "bitsandbytes quantization": _config_edit(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
    "pickle weights": _pickle_weights,
    "no config.json": lambda src: (src / "config.json").unlink(),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
@pytest.mark.parametrize("command", ["prune", "score", "score --offload layerwise"])
def test_bad_model(world, case, command):
    root, src = world
    BAD_MODELS[case](src)
    before = [digest(src)]
    out = root / ("out" if command == "prune" else "s.safetensors")
    argv = prune_args(src, out) if command == "prune" else \
        ["score", src, "--out", out, "--calib", "calib.npy", "--samples", "4", "--seq-len", "16", "--quiet",
         *command.split()[1:]]
    code, err = run(argv)
    assert_clean_failure(code, err, folder=root, sources=[src], before=before, absent=out, what=case)
    assert not (root / "EVIL_RAN").exists(), "unpickling ran code"


# ---------------------------------------------------------------------------------- bad data and options

def _bad_data(root: Path) -> dict[str, list]:
    np.save(root / "big_ids.npy", np.full((4, 16), VOCAB + 5))
    (root / "text.txt").write_text("some text")
    (root / "ids.bin").write_bytes(b"\x01\x00" * 64)
    (root / "not_scores.safetensors").write_text("garbage")
    save_file({f"model.layers.{i}.mlp": torch.ones(FFN, dtype=torch.float64) for i in range(4)},
              str(root / "other_scores.safetensors"))
    (root / "always.txt").write_text("nope\n")
    (root / "run.ckpt").write_text("garbage")
    base = ["--samples", "4", "--seq-len", "16", "--quiet"]
    return {
        "missing calibration": ["--ffn-keep", "16", "--calib", "nope.npy", *base],
        "ids beyond the vocabulary": ["--ffn-keep", "16", "--calib", "big_ids.npy", *base],
        "text without a tokenizer": ["--ffn-keep", "16", "--calib", "text.txt", *base],
        ".bin without --calib-dtype": ["--ffn-keep", "16", "--calib", "ids.bin", *base],
        "scores not safetensors": ["--ffn-keep", "16", "--scores", "not_scores.safetensors", "--quiet"],
        "scores of a 4-layer model": ["--ffn-keep", "16", "--scores", "other_scores.safetensors", "--quiet"],
        "--device tpu": ["--ffn-keep", "16", "--calib", "calib.npy", "--device", "tpu", *base],
        "--device meta": ["--ffn-keep", "16", "--calib", "calib.npy", "--device", "meta", *base],
        "--ffn-multiple rounds to everything": ["--ffn-keep", "0.5", "--ffn-multiple", "1000", "--calib",
                                                "calib.npy", *base],
        "--vocab-always without a vocabulary cut": ["--ffn-keep", "16", "--calib", "calib.npy",
                                                    "--vocab-always", "always.txt", *base],
        "--vocab-always without a tokenizer": ["--vocab-keep", "30", "--vocab-always", "always.txt", "--quiet"],
        "--ffn-keep 0": ["--ffn-keep", "0", "--calib", "calib.npy", *base],
        "nothing to prune": ["--quiet"],
    }


def test_bad_data_and_options(world):
    root, src = world
    before = [digest(src)]
    for case, extra in _bad_data(root).items():
        out = root / "out"
        code, err = run(["prune", src, "--out", out, *extra])
        assert_clean_failure(code, err, folder=root, sources=[src], before=before, absent=out, what=case)


def test_bad_resume_checkpoint_and_check_device(world):
    root, src = world
    (root / "s.safetensors.ckpt").write_text("garbage")
    code, err = run(["score", src, "--out", "s.safetensors", "--calib", "calib.npy", "--samples", "4",
                     "--seq-len", "16", "--resume", "--quiet"])
    assert_clean_failure(code, err, folder=root, sources=[src], before=[digest(src)], absent=root / "s.safetensors",
                         what="damaged checkpoint")
    assert "damaged" in err
    if not torch.cuda.is_available():
        code, err = run(["check", "--device", "cuda"])
        assert code == 2 and err == "compact check: error: --device cuda: no CUDA device is available\n", err
    code, err = run(["check", "--device", "bogus"])
    assert code == 2 and err == "compact check: error: --device must be auto, cpu, cuda or cuda:N, got 'bogus'\n", err


# ------------------------------------------------------------------------------------------- --out paths

def test_out_that_would_destroy_something(world):
    root, src = world
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes")
    sources = [src, root / "mine"]
    before = [digest(s) for s in sources]
    weights = src / "model.safetensors"
    cases = {
        "prune into the source": prune_args(src, src, "--overwrite"),
        "prune inside the source": prune_args(src, src / "sub", "--overwrite"),
        "prune above the source": prune_args(src, root, "--overwrite"),
        "prune into the working directory": prune_args(src, ".", "--overwrite"),
        "prune above the working directory": prune_args(src, "..", "--overwrite"),
        "prune over a folder compact did not write": prune_args(src, root / "mine", "--overwrite"),
        "score over the source weights": ["score", src, "--out", weights, "--calib", "calib.npy", "--overwrite",
                                          "--samples", "4", "--seq-len", "16", "--quiet"],
        "score inside the source": ["score", src, "--out", src / "s.safetensors", "--calib", "calib.npy",
                                    "--samples", "4", "--seq-len", "16", "--quiet"],
        "score onto a directory": ["score", src, "--out", root / "mine", "--calib", "calib.npy", "--overwrite",
                                   "--samples", "4", "--seq-len", "16", "--quiet"],
        "score over a file compact did not write": ["score", src, "--out", root / "mine" / "notes.txt",
                                                    "--calib", "calib.npy", "--overwrite", "--quiet"],
    }
    for case, argv in cases.items():
        code, err = run(argv)
        assert_clean_failure(code, err, folder=root, sources=sources, before=before, what=case)
        assert sorted(p.name for p in root.iterdir()) == ["calib.npy", "mine", "src"], case
        assert not (src / "s.safetensors").exists() and not (src / "sub").exists(), case


def test_overwrite_replaces_compacts_own_output(world):
    root, src = world
    assert run(prune_args(src, "out"))[0] == 0
    assert (root / "out" / output.MARKER).is_file()
    code, err = run(prune_args(src, "out"))
    assert code == 2 and "--overwrite" in err
    assert run(prune_args(src, "out", "--overwrite"))[0] == 0
    assert not leftovers(root)


def test_symlinked_long_named_out_and_umask(world):
    root, src = world
    (root / "target").mkdir()
    (root / "link").symlink_to(root / "target")
    old = os.umask(0o022)
    try:
        code, err = run(prune_args(src, "link"))
        assert code == 0, err
        assert (root / "link").is_symlink() and (root / "target" / "config.json").is_file()
        assert run(prune_args(src, "link", "--overwrite"))[0] == 0
        assert (root / "link").is_symlink() and (root / "target" / "compact_report.json").is_file()
        long = "o" * 245
        code, err = run(prune_args(src, long))
        assert code == 0, err
        assert (root / long / "config.json").is_file()
        assert (root / long).stat().st_mode & 0o777 == 0o755
        code, err = run(["score", src, "--out", "s.safetensors", "--calib", "calib.npy", "--samples", "4",
                         "--seq-len", "16", "--quiet"])
        assert code == 0, err
        assert (root / "s.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    assert not leftovers(root)


def test_identical_score_runs_give_identical_bytes(world):
    root, src = world
    files = []
    for name in ("a.safetensors", "b.safetensors"):
        argv = ["score", src, "--out", name, "--calib", "calib.npy", "--samples", "4", "--seq-len", "16", "--quiet"]
        assert run(argv)[0] == 0
        files.append((root / name).read_bytes())
    assert files[0] == files[1], "two identical score runs wrote different bytes"


def test_stale_staging_is_removed_and_said(world):
    root, src = world
    stale = Path(output._stage_prefix(root / "out") + "x1y2.partial")
    (root / stale).mkdir()
    (root / stale / "model.safetensors").write_bytes(b"0" * 100)
    old = Path(output._stage_prefix(root / "out") + "z9.old")
    (root / old).mkdir()
    other = Path(output._stage_prefix(root / "another-out") + "q7.partial")  # a killed run into another --out
    (root / other).mkdir()
    (root / ".compact.mine").mkdir()  # the user's own folder with a similar name stays
    with pytest.warns(UserWarning, match="interrupted run"):
        assert len(output.remove_stale(root / "out")) == 3
    assert leftovers(root) == [".compact.mine"]
    (root / ".compact.mine").rmdir()
    assert run(prune_args(src, "out"))[0] == 0


def test_concurrent_runs_into_one_out(world):
    """Two prunes race for the same --out: one writes it, the other fails cleanly; nothing is left over."""
    root, src = world
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-m", "compact", *map(str, prune_args(src, "out"))], cwd=root,
                              env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # both may finish one after the other, never both replacing
    for code, err in results:
        assert "Traceback" not in err and (code == 0 or len(err.strip().splitlines()) == 1), err
    assert (root / "out" / "config.json").is_file() and not leftovers(root)


# ---------------------------------------------------------------------------------------------- signals

def _interruptible() -> None:
    """SIGINT handled (KeyboardInterrupt), as in a terminal: a shell's background job (`cmd &`, nohup) starts
    with SIGINT ignored, Python then installs no handler, and children inherit the ignoring (exec resets only
    handled signals)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def interruptible():
    saved = signal.getsignal(signal.SIGINT)
    _interruptible()
    yield
    signal.signal(signal.SIGINT, saved)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_writing_removes_the_staging(world, monkeypatch, interruptible, sig, code):
    """The signal arrives while the checkpoint is being written (inside the staging folder)."""
    from compact.pruning import cut

    root, src = world
    before = [digest(src)]

    def signal_self(*args, **kwargs):
        assert leftovers(root), "the staging folder should exist while writing"
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler raises before this returns

    monkeypatch.setattr(cut, "save_tokenizer", signal_self)
    got, err = run(prune_args(src, "out"))
    assert_clean_failure(got, err, folder=root, sources=[src], before=before, absent=root / "out", want=code,
                         what=signal.Signals(sig).name)


def test_a_sigint_once_the_output_is_complete_changes_nothing(world, monkeypatch, interruptible):
    """The pruned folder is in place: a Ctrl-C from then on is ignored, and the run exits 0 with its output."""
    from compact import runs

    root, src = world
    discard = runs.discard

    def signal_self(folder):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # (a handler that raised would raise here)
        discard(folder)

    monkeypatch.setattr(runs, "discard", signal_self)
    got, err = run(prune_args(src, "done"))
    assert got == 0 and err == "" and (root / "done" / "compact_report.json").is_file(), (got, err)


def test_an_interrupted_gguf_says_what_is_there_and_how_to_finish(world, monkeypatch, interruptible):
    """Interrupted while the GGUF is written: the pruned folder is complete, and the one line says so and names
    the command that writes the GGUF."""
    from compact import export

    root, src = world

    def signal_self(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises before this returns

    monkeypatch.setattr(export, "check_exportable", lambda *a: None)
    monkeypatch.setattr(cli, "_write_gguf", signal_self)
    got, err = run(prune_args(src, "half", "--gguf", "f16"))
    assert got == 130 and (root / "half" / "compact_report.json").is_file(), (got, err)
    assert err.count("\n") == 1 and "holds the complete pruned checkpoint" in err, err
    assert "compact export half --gguf f16" in err, err


@pytest.mark.slow  # a scoring run started and signalled in a fresh process: seconds each
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_scoring(world, sig, code):
    """A child process interrupted mid-scoring: one line, its exit code, no output, a resumable checkpoint."""
    root, src = world
    # The engine passes every row through one layer, then the next: 3000 rows make a layer last long enough (~2 s
    # on a 2-core VM, 200 times the 10 ms the test polls at) that the signal, sent once the first layer's checkpoint
    # is there, lands before the last layer is done.
    np.save(root / "long.npy", np.random.default_rng(1).integers(0, VOCAB, size=(3000, 16)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = ["score", src, "--out", "s.safetensors", "--calib", "long.npy", "--samples", "3000", "--seq-len", "16",
            "--checkpoint-every", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "compact", *argv], cwd=root, env=env, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_interruptible)
    ckpt, deadline = root / "s.safetensors.ckpt", time.time() + 120
    try:
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert ckpt.exists(), f"no checkpoint appeared (exit {proc.poll()})"
        proc.send_signal(sig)
        got, err = proc.wait(timeout=120), proc.stderr.read()
    finally:
        proc.kill()  # never leave the child running when the test fails
        proc.wait()
    assert got == code and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (got, err)
    assert not (root / "s.safetensors").exists() and not leftovers(root)


KILLED_WRITER = """
import os, signal, sys, time
from pathlib import Path
from compact import output
with output.staged_dir(Path(sys.argv[1]), overwrite=False) as tmp:
    (tmp / "model.safetensors").write_bytes(b"0" * 1000)
    print(tmp, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
"""


def test_killed_run_leaves_a_partial_the_next_run_removes(world):
    """SIGKILL cannot be caught: its staging folder stays, and the next run into the same place removes it
    (and says so) because no process holds its lock; a live run's staging folder is left alone."""
    root, src = world
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    live = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, "out", "live"], cwd=root, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        held = Path(live.stdout.readline().strip())
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, "out", "kill"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -signal.SIGKILL and len(leftovers(root)) == 2, killed.stderr
        with pytest.warns(UserWarning, match="interrupted run"):
            removed = output.remove_stale(root / "out")
        assert len(removed) == 1 and held.exists() and leftovers(root) == [held.name]
    finally:
        live.kill()
        live.wait()
    with pytest.warns(UserWarning, match="interrupted run"):
        output.remove_stale(root / "out")
    assert run(prune_args(src, "out"))[0] == 0 and not leftovers(root)


# ----------------------------------------------------------------------------------- read-only, full disk

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 KB, smaller than a pruned tiny model (root only; skipped where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_and_read_only_disk(world, small_disk):
    root, src = world
    before = [digest(src)]
    code, err = run(prune_args(src, small_disk / "out"))
    assert_clean_failure(code, err, folder=small_disk, sources=[src], before=before, absent=small_disk / "out",
                         what="full disk")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    code, err = run(prune_args(src, small_disk / "out"))
    assert_clean_failure(code, err, folder=small_disk, sources=[src], before=before, absent=small_disk / "out",
                         what="read-only disk")


# ------------------------------------------------------------------------- scores that cannot rank (#19)

def test_scores_that_cannot_rank_are_an_error_naming_the_layer():
    good = torch.arange(8, dtype=torch.float64)
    nan = good.clone().index_fill_(0, torch.tensor([3]), float("nan"))
    inf = good.clone().index_fill_(0, torch.tensor([5, 6]), float("inf"))
    for bad, message in [(torch.zeros(8), "all 8 channel scores are 0.*no weight"),
                         (torch.full((8,), 2.5), "all 8 channel scores are 2.5"),
                         (nan, r"1 channel score\(s\) are not finite \(channel 3 scores nan\)"),
                         (inf, r"2 channel score\(s\) are not finite \(channel 5 scores inf\)")]:
        with pytest.raises(ValueError, match=f"^model.layers.1.mlp: {message}"):
            selection.select_channels({"model.layers.0.mlp": good, "model.layers.1.mlp": bad}, 4)
    assert selection.top_channels(torch.zeros(8), 8) == list(range(8))  # keeping all needs no ranking


def test_cli_refuses_scores_that_cannot_rank(world):
    root, src = world
    before = [digest(src)]
    zeros = {f"model.layers.{i}.mlp": torch.zeros(FFN, dtype=torch.float64) for i in range(LAYERS)}
    nan = {**zeros, "model.layers.1.mlp": torch.arange(FFN, dtype=torch.float64).index_fill_(0, torch.tensor([7]),
                                                                                               float("nan"))}
    np.save(root / "rare.npy", np.random.default_rng(0).integers(40, VOCAB, size=(4, 16)))  # none of ids 0..29
    cases = {"all-zero scores file": (zeros, "model.layers.0.mlp: all 32 channel scores are 0"),
             "NaN in a scores file": (nan, "model.layers.0.mlp: all 32")}
    for case, (tensors, message) in cases.items():
        save_file(tensors, str(root / "s.safetensors"))
        code, err = run(["prune", src, "--out", "out", "--ffn-keep", "16", "--scores", "s.safetensors", "--quiet"])
        assert_clean_failure(code, err, folder=root, sources=[src], before=before, absent=root / "out", what=case)
        assert message in err, err
    save_file({**nan, "model.layers.0.mlp": torch.arange(FFN, dtype=torch.float64)}, str(root / "s.safetensors"))
    code, err = run(["prune", src, "--out", "out", "--ffn-keep", "16", "--scores", "s.safetensors", "--quiet"])
    assert "model.layers.1.mlp: 1 channel score(s) are not finite (channel 7" in err, err
    code, err = run(["prune", src, "--out", "out", "--vocab-keep", "30", "--vocab-order", "id", "--ffn-keep", "16",
                     "--calib", "rare.npy", "--samples", "4", "--seq-len", "16", "--quiet"])
    assert_clean_failure(code, err, folder=root, sources=[src], before=before, absent=root / "out",
                         what="zero calibration weight")
    assert "model.layers.0.mlp: all 32 channel scores are 0" in err and "kept vocabulary" in err, err


# --------------------------------------------------------------------------------------- Python API (#19)

@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    return LlamaForCausalLM(config).eval(), ids


@pytest.mark.parametrize("keep,message", [
    ([-1], r"in \[0, 64\) \(the vocabulary size\), got -1"), ([3, 64], "got 64"),
    (torch.ones(VOCAB, dtype=torch.bool), "not a boolean mask"), ([True, False], "not a boolean mask"),
    (np.ones(VOCAB, dtype=bool), "not a boolean mask"),
    ([1.5, 2.0], r"integer token ids, got float32 values \(e.g. 1.5\)"),
    (torch.tensor([3.0]), "integer token ids, got float32"), ([[1, 2]], "1-D sequence"),
    ("abc", "integer token ids")])
def test_keep_token_ids_are_checked(tiny, keep, message):
    from compact import ChannelScorer, score_channels

    model, ids = tiny
    with pytest.raises(ValueError, match=message):
        score_channels(model, ids, keep_token_ids=keep)
    with pytest.raises(ValueError, match=message):
        ChannelScorer(model, keep_token_ids=keep)


def test_keep_token_ids_as_list_array_or_tensor_give_the_same_scores(tiny):
    from compact import score_channels

    model, ids = tiny
    kept = [int(i) for i in ids[0, :4]]
    want = score_channels(model, ids, keep_token_ids=kept)
    for same in (np.array(kept), torch.tensor(kept, dtype=torch.int32), set(kept)):
        got = score_channels(model, ids, keep_token_ids=same)
        assert all(torch.equal(got[n], want[n]) for n in want)
    assert all(float(s.sum()) > 0 for s in want.values())
    assert all(float(s.sum()) == 0 for s in score_channels(model, ids, keep_token_ids=[]).values())


def test_nested_scorers_on_one_model_are_refused(tiny):
    from compact import ChannelScorer, score_channels

    model, ids = tiny
    want = score_channels(model, ids)
    outer = ChannelScorer(model)
    with outer, torch.no_grad():
        with pytest.raises(RuntimeError, match="already active on this model"):
            with ChannelScorer(model, path="hooks"):
                pass
        with pytest.raises(RuntimeError, match="already active"):
            score_channels(model, ids)
        with pytest.raises(RuntimeError, match="already active"):
            with outer.driven():  # refused without undoing the entered scorer
                pass
        model(input_ids=ids)
    for name, s in want.items():
        torch.testing.assert_close(outer.scores[name], s, rtol=1e-5, atol=0)
    assert float(next(iter(want.values())).sum()) > 0
    with ChannelScorer(model):  # usable again after exit
        pass


def test_api_inputs_get_messages_that_say_what_is_wrong(tiny):
    from transformers import LlamaForCausalLM

    from compact import ChannelScorer, score_channels

    model, ids = tiny
    with torch.device("meta"):
        meta = LlamaForCausalLM(model.config)
    cases = [
        (lambda: score_channels(model, torch.zeros(3, 0, dtype=torch.long)), ValueError,
         r"shape \(3, 0\): there are no tokens"),
        (lambda: score_channels(model, ids, torch.ones(8, dtype=torch.long)), ValueError,
         r"attention_mask must be a tensor of the shape of input_ids \(3, 8\), got \(8,\)"),
        (lambda: score_channels(model, ids, torch.ones(3, 7, dtype=torch.long)), ValueError,
         r"input_ids \(3, 8\), got \(3, 7\)"),
        (lambda: score_channels(model, ids.tolist()), TypeError, "must be a torch.Tensor .* got list"),
        (lambda: score_channels(model, ids.float()), ValueError, "integer token ids, got dtype float32"),
        (lambda: score_channels(model, ids + VOCAB), ValueError, r"in \[0, 64\).*from 64"),
        (lambda: score_channels(meta, ids), ValueError, "weights are not loaded .*meta device"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    with ChannelScorer(model), torch.no_grad(), pytest.raises(ValueError, match="mask must have the shape"):
        model(input_ids=ids, attention_mask=torch.ones(3, 7, dtype=torch.long))  # the user's own loop


# ------------------------------------------------------------------------------ modes and the swap (#19)

@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_every_written_file_follows_the_umask(world, umask, file_mode, dir_mode):
    root, src = world
    old = os.umask(umask)
    try:
        code, err = run(prune_args(src, "out"))
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {p.name: p.stat().st_mode & 0o777 for p in (root / "out").iterdir()}
    assert modes["model.safetensors"] == file_mode and set(modes.values()) == {file_mode}, modes
    assert (root / "out").stat().st_mode & 0o777 == dir_mode


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_between_the_two_renames_of_overwrite_loses_nothing(world, monkeypatch, interruptible, sig, code):
    """The signal arrives right after the old output was moved aside: it is held until the new one is in place."""
    root, src = world
    assert run(prune_args(src, "out"))[0] == 0
    (root / "out" / "compact_report.json").write_text("{}")  # tell the old output from the new one
    rename = os.rename

    def rename_then_signal(a, b):
        rename(a, b)
        if Path(b).name == "out" and Path(b).parent.name.endswith(".old"):
            os.kill(os.getpid(), sig)
            time.sleep(0.5)  # unprotected, the handler raises here

    monkeypatch.setattr(os, "rename", rename_then_signal)
    got, err = run(prune_args(src, "out", "--overwrite"))
    monkeypatch.undo()
    assert got == code and len(err.strip().splitlines()) == 1, err
    report = json.loads((root / "out" / "compact_report.json").read_text())
    assert report["kept_channels"] and (root / "out" / "model.safetensors").is_file() and not leftovers(root)


def test_an_output_moved_aside_by_a_killed_overwrite_is_put_back(world):
    """SIGKILL between the renames leaves the old output in a `.old` staging folder: the next run puts it back."""
    root, src = world
    assert run(prune_args(src, "out"))[0] == 0
    before = digest(root / "out")
    aside = root / (output._stage_prefix(root / "out") + "k1ll3d.old")
    aside.mkdir()
    os.rename(root / "out", aside / "out")
    with pytest.warns(UserWarning, match="put back out"):
        output.remove_stale(root / "other")  # any later run into the same parent
    assert digest(root / "out") == before and not leftovers(root)
    aside.mkdir()  # moved aside and replaced (killed before the clean-up): the old copy goes
    (aside / "out").mkdir()
    (aside / "out" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="removed 1"):
        output.remove_stale(root / "out")
    assert digest(root / "out") == before and not leftovers(root)


# ------------------------------------------------------------------------------- a fast, quiet start (#19)

def test_help_and_version_import_no_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for argv in (["--version"], ["--help"], ["prune", "--help"], ["check", "--help"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "compact", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
        assert done.returncode == 0 and "compact" in done.stdout, done.stderr[-2000:]
        assert "torch" not in imported and "compact.options" in imported, argv  # options: the choices
    probe = ("import sys; from compact import cli; cli._parser().parse_args(['prune', 'm', '--out', 'o', "
             "'--ffn-keep', '0.5', '--ffn-criterion', 'wanda']); print(sorted(m for m in sys.modules if "
             "m.split('.')[0] in ('torch', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_an_early_sigint_is_one_line(world, delay):
    """SIGINT while torch and transformers are still being imported: exit 130, one line, no traceback."""
    root, src = world
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "compact", *map(str, prune_args(src, "out"))]
    proc = subprocess.Popen(argv, cwd=root, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        got, err = proc.wait(timeout=120), proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert got == 130 and err == "compact prune: interrupted; no output was written\n", (got, err)
    assert not (root / "out").exists() and not leftovers(root)


def test_a_tokenizer_without_regular_tokens_does_not_fit():
    from tokenizers import Tokenizer, models as tokenizer_models
    from transformers import PreTrainedTokenizerFast

    from compact import vocab
    from compact.options import VOCAB_ORDERS

    specials = {"<s>": 0, "</s>": 1, "<unk>": 2}
    backend = Tokenizer(tokenizer_models.WordLevel(specials, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for order in VOCAB_ORDERS:
        with pytest.raises(ValueError, match="^the tokenizer does not fit the model: none of its 3 tokens .* the "
                                             "model's 32000 embedding rows"):
            vocab.Vocabulary(tok, 32000).kept(100, order=order, counts=torch.ones(32000))


# ------------------------------------------------------------------------------------- model card (#19)

def test_model_card_of_a_pruned_folder(world):
    import yaml

    from compact import report

    root, src = world
    code, err = run(prune_args(src, "out", "--vocab-keep", "40", "--vocab-order", "id"))
    assert code == 0, err
    result = json.loads((root / "out" / "compact_report.json").read_text())
    result["source"] = "/cache/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/93efa2f"
    result["evaluation"] = {"data": "held-out.txt", "results": {
        "source": {"bits_per_byte": 1.2345, "perplexity": 20.5}, "pruned": {"bits_per_byte": 1.3, "perplexity": 25.0}}}
    card = report.model_card(result)
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {"base_model": "HuggingFaceTB/SmolLM2-135M", "library_name": "transformers",
                                     "pipeline_tag": "text-generation",
                                     "tags": ["compact", "pruned", "vocabulary-pruning", "ffn-pruning"]}
    before, after = result["parameters"]["before"], result["parameters"]["after"]
    assert before["total"] == 6736 and after["total"] < before["total"]
    assert f"| total | {before['total']:,} | {after['total']:,} | {after['total'] / before['total']:.1%} |" in body
    vocab_after = result["sizes"]["vocab_after"]
    assert f"- vocabulary: 64 -> {vocab_after} tokens ({64 - vocab_after} dropped" in body
    assert ("- FFN: 32 -> 16 channels in each of the 2 layers, down_proj re-fit by least squares on the "
            "calibration activations\n") in body  # the default re-fit (sequential) is said
    assert "## Calibration data\n\ncalib.npy: 4 x 16 tokens" in body
    assert "| bits / byte | 1.2345 | 1.3000 |" in body and "On held-out.txt:" in body
    assert "`ffn_keep=16`" in body and "`vocab_keep=40`" in body and "overwrite" not in body
    result["source"], result["evaluation"] = "src", None
    front = report.model_card(result).split("---\n")[1]
    assert "base_model" not in yaml.safe_load(front)  # a local folder: no hub id to name


@pytest.mark.parametrize("kind", ["unigram", "wordpiece"])
def test_ffn_only_prune_keeps_a_tokenizer_it_could_not_cut(kind, tmp_path):
    """Item 9: an FFN-only prune never cuts the vocabulary, so a Unigram or WordPiece tokenizer (which the
    vocabulary cut does not support) is written unchanged instead of failing after scoring."""
    from tokenizers import Tokenizer, models as tok_models
    from transformers import PreTrainedTokenizerFast

    import tiny_models

    vocab = {f"t{i}": i for i in range(tiny_models.VOCAB)}
    backend = Tokenizer(tok_models.Unigram([(t, -1.0) for t in vocab], 0, False) if kind == "unigram"
                        else tok_models.WordPiece(vocab, unk_token="t0"))
    tiny_models.build("llama").save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "model")
    np.save(tmp_path / "calib.npy", np.arange(64).reshape(2, 32) % tiny_models.VOCAB)
    rc, err = run(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--calib",
                   str(tmp_path / "calib.npy"), "--seq-len", "32", "--ffn-keep", "24ch", "--quiet"])
    assert rc == 0, err
    report = json.loads((tmp_path / "out" / "compact_report.json").read_text())
    assert report["tokenizer"] == "unchanged (vocabulary not cut)" and report["sizes"]["intermediate_after"] == 24
    saved = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]
    assert saved["type"] == ("Unigram" if kind == "unigram" else "WordPiece") and len(saved["vocab"]) == len(vocab)


def test_twice_pruned_model_reads_token_ids_of_the_original(tmp_path):
    """Item 3: a model pruned twice records each token's id in the original model (the composition of both
    cuts), and token-id data in original ids is renumbered through it: every position lands on the token it
    named, and an id the first cut dropped is refused naming it."""
    import tiny_models
    from compact import loading, pruning
    from compact.options import CalibOptions

    tiny_models.build("llama").save_pretrained(tmp_path / "model")
    vocab = tiny_models.VOCAB
    ids = np.random.default_rng(5).integers(0, vocab, size=(4, 50))
    np.save(tmp_path / "all.npy", ids)
    common = ["--calib", str(tmp_path / "all.npy"), "--seq-len", "50", "--vocab-order", "frequency", "--quiet"]
    assert run(["prune", tmp_path / "model", "--out", tmp_path / "once", "--vocab-keep", "80", *common])[0] == 0
    assert run(["prune", tmp_path / "once", "--out", tmp_path / "twice", "--vocab-keep", "60", *common[:-3],
                "--vocab-order", "id", "--quiet"])[0] == 0
    once = json.loads((tmp_path / "once" / "compact_report.json").read_text())
    twice = json.loads((tmp_path / "twice" / "compact_report.json").read_text())
    composed = [once["kept_token_ids"][i] for i in twice["kept_token_ids"]]
    assert twice["original_token_ids"] == composed and twice["vocab_original"] == vocab
    kept = np.isin(ids, composed)
    data = np.where(kept, ids, composed[0])  # original ids the twice-pruned model still has
    np.save(tmp_path / "kept.npy", data)
    loaded = loading.load(str(tmp_path / "twice"), dtype="float32")
    calib = pruning.calibrate(loaded, CalibOptions(str(tmp_path / "kept.npy"), samples=4, seq_len=50))
    assert calib.input_ids.tolist() == [[composed.index(int(t)) for t in row] for row in data]
    dropped = next(t for t in range(vocab) if t not in once["kept_token_ids"])
    np.save(tmp_path / "dropped.npy", np.full((1, 50), dropped))
    with pytest.raises(ValueError, match=f"token id {dropped}, which this pruned model's vocabulary dropped"):
        pruning.calibrate(loaded, CalibOptions(str(tmp_path / "dropped.npy"), samples=1, seq_len=50))


def test_checks_that_need_no_model_come_before_loading_it(tmp_path):
    """Item 8: conflicting targets and a missing calibration file are refused before the model is looked at
    (the model path here does not even exist); a read-only --out before any work; an unrelated OUT.ckpt no
    longer blocks a prune that neither checkpoints nor resumes."""
    import tiny_models

    missing = tmp_path / "no-such-model"
    rc, err = run(["prune", missing, "--out", tmp_path / "o", "--target-params", "0.5", "--vocab-keep", "10"])
    assert rc == 2 and "not both" in err and err.count("\n") == 1, err
    rc, err = run(["prune", missing, "--out", tmp_path / "o", "--ffn-keep", "0.5", "--calib", tmp_path / "none.txt"])
    assert rc == 2 and "none.txt: calibration file not found" in err, err

    tiny_models.build("llama").save_pretrained(tmp_path / "model")
    np.save(tmp_path / "calib.npy", np.arange(64).reshape(2, 32) % tiny_models.VOCAB)
    common = ["prune", tmp_path / "model", "--calib", tmp_path / "calib.npy", "--seq-len", "32", "--ffn-keep", "24ch",
              "--quiet"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if not os.access(locked, os.W_OK):  # (root writes anywhere: then there is nothing to refuse)
            rc, err = run([*common, "--out", locked / "out"])
            assert rc == 2 and f"{locked} is not writable" in err, err
    finally:
        locked.chmod(0o755)
    (tmp_path / "last.ckpt").write_text("a Lightning checkpoint, not compact's")
    rc, err = run([*common, "--out", tmp_path / "last"])
    assert rc == 0, err
    assert (tmp_path / "last.ckpt").read_text() == "a Lightning checkpoint, not compact's"
    (tmp_path / "stale.ckpt").write_text("an interrupted run")
    rc, err = run([*common[:2], "--out", tmp_path / "stale", "--target-params", "0.8", "--calib",
                   tmp_path / "calib.npy", "--checkpoint-every", "2", "--refit", "none"])
    assert rc == 2 and "stale.ckpt is damaged or not a checkpoint compact wrote" in err, err
    assert not (tmp_path / "stale").exists() and (tmp_path / "stale.ckpt").read_text() == "an interrupted run"


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_written_dtype_is_the_same_in_memory_and_offloaded(dtype, tmp_path):
    """Item 2: --dtype is the compute dtype; the output is stored in --dtype when it is given, else in the
    source's storage dtype (an fp16 source computed in float32 on the CPU is written back as fp16, never larger).
    In memory and --offload layerwise write the same bytes, and the report records both dtypes."""
    import tiny_models
    from test_layerwise_slicing import assert_same_checkpoint

    tiny_models.build("llama").to(torch.float16).save_pretrained(tmp_path / "model")
    np.save(tmp_path / "calib.npy", np.arange(64).reshape(2, 32) % tiny_models.VOCAB)
    outs = {}
    for mode in ("memory", "layerwise"):
        outs[mode] = tmp_path / mode
        rc, err = run(["prune", tmp_path / "model", "--out", outs[mode], "--calib", tmp_path / "calib.npy",
                       "--seq-len", "32", "--ffn-keep", "24ch", "--vocab-keep", "80", "--dtype", dtype, "--quiet",
                       *(["--offload", "layerwise"] if mode == "layerwise" else [])])
        assert rc == 0, err
        report = json.loads((outs[mode] / "compact_report.json").read_text())
        want = "float16" if dtype == "auto" else dtype
        assert report["dtype"] == {"compute": "float32" if dtype == "auto" else dtype, "output": want,
                                   "source": "float16", "source_bits_per_weight": 16.0}
        assert {t.dtype for t in load_file(outs[mode] / "model.safetensors").values()} == {getattr(torch, want)}
    assert_same_checkpoint(outs["layerwise"], outs["memory"], f"--dtype {dtype}")
    size = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert (outs["memory"] / "model.safetensors").stat().st_size < size


def test_tokenizer_option_replaces_a_broken_one_and_a_damaged_report_blocks_only_id_data(tmp_path):
    """Item 10: --tokenizer stands in for a model folder's broken tokenizer (which, without it, is an error
    naming the folder); a damaged compact_report.json refuses only token-id data, which it would renumber."""
    from compact import loading, pruning
    from compact.options import CalibOptions
    from compact.demo import train_tokenizer

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    good = train_tokenizer(["the state of the union is strong"] * 20, vocab_size=290)
    good.save_pretrained(tmp_path / "tok")
    (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=f"model {folder}: its tokenizer files cannot be loaded"):
        loading.load(str(folder))
    (tmp_path / "text.txt").write_text("the state of the union\n" * 40)
    rc, err = run(["eval", folder, "--tokenizer", tmp_path / "tok", "--data", tmp_path / "text.txt", "--seq-len", "16"])
    assert rc == 0, err

    (folder / "tokenizer.json").unlink()
    (folder / "compact_report.json").write_text('{"kept_token_ids": [0, 1')
    loaded = loading.load(str(folder))
    assert loaded.report is None and "is damaged" in loaded.report_damaged
    np.save(tmp_path / "ids.npy", np.arange(32).reshape(2, 16))
    with pytest.raises(ValueError, match="compact_report.json is damaged .* token-id data"):
        pruning.calibrate(loaded, CalibOptions(str(tmp_path / "ids.npy"), samples=2, seq_len=16))
    loaded.tokenizer = good
    text = pruning.calibrate(loaded, CalibOptions(str(tmp_path / "text.txt"), samples=2, seq_len=16))
    assert text.input_ids.shape == (2, 16)


def test_planner_weighs_multiples_and_a_ratio_never_rounds_to_everything():
    """Item 14: the planner's FFN sizes are multiples of --ffn-multiple (and all channels), not I - j * multiple;
    a ratio below 1 that rounds to every channel is refused instead of silently keeping them all."""
    from compact import budget

    assert budget.ffn_sizes(100, 16) == [100, 96, 80, 64, 48, 32, 16]
    assert budget.ffn_sizes(128, 64) == [128, 64]
    assert selection.resolve_ffn_keep("0.5", 100, 16) == 48
    with pytest.raises(ValueError, match="--ffn-keep 0.999 rounds to all 1536 channels at --ffn-multiple 64"):
        selection.resolve_ffn_keep("0.999", 1536, 64)
    assert selection.resolve_ffn_keep("1.0", 1536, 64) == 1536


def test_options_with_nothing_to_do_are_said(tmp_path):
    """Item 14: --check on a prune that runs no calibration pass, and an explicit --refit on a prune that cuts no
    FFN channel, warn instead of silently doing nothing."""
    import tiny_models
    from compact import loading, pruning
    from compact.options import CalibOptions
    from compact.options import Method, Run

    tiny_models.build("llama").save_pretrained(tmp_path / "model")
    np.save(tmp_path / "calib.npy", np.arange(64).reshape(2, 32) % tiny_models.VOCAB)
    calib = CalibOptions(str(tmp_path / "calib.npy"), samples=2, seq_len=32)
    loaded = loading.load(str(tmp_path / "model"))
    checked = Run(check=True, progress=False)
    for method, run, said in ((Method(vocab_keep=60), checked, "nothing was checked"),
                              (Method(ffn_keep="24ch", ffn_criterion="random", refit="none"), checked,
                               "nothing was checked"),
                              (Method(vocab_keep=60, refit="sequential"), Run(progress=False),
                               "nothing was re-fitted")):
        with pytest.warns(UserWarning, match=said):
            pruning.decide(loaded, method, calib, run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruning.decide(loaded, Method(ffn_keep="24ch"), calib, checked)
        # --refit auto (sequential with --target-params) and a plan that cuts no FFN channel: nothing to say
        planned = pruning.decide(loaded, Method(target_params=0.95, ffn_multiple=8), calib, Run(progress=False))
    assert planned.method.refit == "sequential" and planned.ffn_keep == tiny_models.INTER and not planned.refits


def test_gguf_reader_bar_follows_quiet(monkeypatch):
    """Item 14: the GGUF reader's de-quantizing bar is hidden when transformers' bars are off (--quiet, or no
    terminal), though tqdm read TQDM_DISABLE long before; the reader's tqdm is restored afterwards."""
    from transformers import modeling_gguf_pytorch_utils as reader
    from transformers.utils import logging as hf_logging

    from compact import loading

    original = reader.tqdm
    monkeypatch.setattr(hf_logging, "is_progress_bar_enabled", lambda: False)
    with loading._tqdm_follows_transformers():
        bar = reader.tqdm(range(3), file=io.StringIO())
        assert bar.disable
    assert reader.tqdm is original
    monkeypatch.setattr(hf_logging, "is_progress_bar_enabled", lambda: True)
    with loading._tqdm_follows_transformers():
        assert reader.tqdm is original


def test_calibration_file_messages_say_what_is_wrong(tmp_path):
    """Item 14: a uint64 .npy reports its real maximum, a latin-1 byte its offset in the file, a .jsonl with a BOM
    reads like a .txt with one, a directory or FIFO is not 'not found', a GGUF named .bin is told to be renamed."""
    from compact import loading
    from compact.data import load_calibration
    from compact.options import CalibOptions

    def load(path, **kw):
        return load_calibration(CalibOptions(str(path), samples=1, seq_len=4), vocab_size=100, **kw)

    np.save(tmp_path / "big.npy", np.array([[1, 2, 2**64 - 1, 3]], dtype=np.uint64))
    with pytest.raises(ValueError, match=f"found max {2**64 - 1}"):
        load(tmp_path / "big.npy")
    text = ("a" * 3000 + "\n").encode() + b"caf\xe9\n"
    (tmp_path / "latin1.txt").write_bytes(text)
    with pytest.raises(ValueError, match="at byte 3,004"):
        load(tmp_path / "latin1.txt", tokenizer=object())
    with pytest.raises(ValueError, match="not a regular file \\(a directory\\)"):
        load(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="not a regular file \\(a pipe or device\\)"):
        load(tmp_path / "fifo")
    (tmp_path / "model.bin").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ValueError, match="is a GGUF file named .bin: rename it to model.gguf"):
        loading.locate(str(tmp_path / "model.bin"))


def test_jsonl_with_a_bom_reads_like_txt_with_one(tmp_path):
    from compact.data import load_calibration
    from compact.options import CalibOptions
    from tokenizers_fixtures import llama32_tokenizer

    tokenizer = llama32_tokenizer()
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "the union is strong"}).encode() + b"\n")
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbf" + b"the union is strong")
    got = [load_calibration(CalibOptions(str(tmp_path / f"a.{kind}"), samples=1, seq_len=4), tokenizer=tokenizer,
                            vocab_size=len(tokenizer)).input_ids for kind in ("jsonl", "txt")]
    assert torch.equal(got[0], got[1])


def test_description_counts_only_the_documents_used(tmp_path):
    """Item 14: 39 short documents, of which 1 x 4 tokens use only the first: the description says 1 document."""
    from compact.data import load_calibration
    from compact.options import CalibOptions
    from tokenizers_fixtures import llama32_tokenizer

    tokenizer = llama32_tokenizer()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"the union is strong {i}"}) + "\n"
                                                 for i in range(39)))
    calib = load_calibration(CalibOptions(str(tmp_path / "docs.jsonl"), samples=1, seq_len=4), tokenizer=tokenizer,
                             vocab_size=len(tokenizer))
    assert calib.input_ids.shape == (1, 4) and " 1 document(s) in the first" in calib.source, calib.source


def test_sigterm_during_shutdown_keeps_the_exit_status():
    """Item 14: the program's status is main()'s; a SIGTERM while the interpreter shuts down afterwards (here from
    an atexit hook) does not turn it into 143."""
    script = ("import atexit, os, signal, sys; from compact import cli; "
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM)); "
              "sys.argv = ['compact', 'check', '--device', 'bogus']; cli.run()")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, (done.returncode, done.stderr)


def test_an_out_of_range_vocab_keep_is_refused_before_the_weights_are_read(tmp_path, monkeypatch):
    """Item 8: --vocab-keep above the tokenizer's regular-token count is refused from the tokenizer alone (the
    model folder's, or --tokenizer's; in memory or --offload layerwise), before any weight is read."""
    from transformers import AutoModelForCausalLM

    from compact import demo, demo_text, vocab

    tokenizer = demo.train_tokenizer(demo_text.stories(50, seed=1))
    demo.build_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    regular = len(vocab.Vocabulary(tokenizer, len(tokenizer)).regular)

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    common = ["--debug", "prune", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--vocab-keep", str(regular + 1)]
    for extra in ([], ["--tokenizer", str(tmp_path / "m")], ["--offload", "layerwise"]):
        with pytest.raises(ValueError, match=f"--vocab-keep must be between 1 and {regular} "):
            cli.main([*common, *extra])
    assert not (tmp_path / "o").exists()


DROPPED = """
import os, signal, sys, time
from compact import cli

class Dropper:
    def __del__(self):  # a SIGINT handled in here raises a KeyboardInterrupt Python drops ("Exception ignored")
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass

with cli._interrupts_repeated() as handled:
    try:
        Dropper()
        time.sleep(5)  # without the repeat, the interrupt is lost and this returns
        sys.exit("the interrupt was lost")
    except KeyboardInterrupt:
        handled()
        print("interrupted")
"""


def test_an_interrupt_python_drops_is_raised_again():
    """Item 11's SIGINT: one that lands in a __del__ method or a weakref callback (seen during imports) raises a
    KeyboardInterrupt Python drops; it is raised again until main() has handled it, and the dropped one's
    "Exception ignored" report stays off stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", DROPPED], capture_output=True, text=True, timeout=60, env=env,
                          preexec_fn=_interruptible)
    assert proc.returncode == 0 and proc.stdout == "interrupted\n", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == "", proc.stderr
