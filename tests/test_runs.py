"""Every mode is the one engine: torchrun over 2 gloo ranks gives one process's prune, a killed run resumes to
the uninterrupted run's bytes (in memory and offloaded, 1 and 2 ranks), streams on disk change nothing."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_models
from compact import cli, engine, runs
from compact.scoring import ScoringOptions
from kernel_ops.tolerances import assert_close

HERE = os.path.dirname(__file__)
LAYERS = 4
MODES = {"memory": [], "offload": ["--offload", "layerwise"]}
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-layer tiny Llama, calibration ids (8 rows of 32) and the default prune's arguments (--target-params
    with --calib: the sequential re-fit), 4 batches of 2."""
    root = tmp_path_factory.mktemp("runs")
    tiny_models.build("llama", layers=LAYERS).save_pretrained(root / "model")
    np.save(root / "calib.npy", np.random.default_rng(0).integers(0, tiny_models.VOCAB, size=(8, 32)))
    args = ["prune", str(root / "model"), "--calib", str(root / "calib.npy"), "--samples", "8", "--seq-len", "32",
            "--target-params", "0.8", "--ffn-multiple", "8", "--batch-size", "2", "--quiet"]
    return root, args


def tensors(folder) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}


def report(folder) -> dict:
    return json.loads((folder / "compact_report.json").read_text())


def assert_same_prune(got, want, what: str) -> None:
    """The same vocabulary and channels, and the same bytes in every tensor."""
    for key in ("kept_token_ids", "kept_channels", "sizes"):
        assert report(got)[key] == report(want)[key], f"{what}: {key} differ"
    a, b = tensors(got), tensors(want)
    assert sorted(a) == sorted(b), what
    for name in b:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), f"{what}: {name} differs"


def assert_prune_within_reduction_order(got, want, what: str) -> None:
    """The same vocabulary and channels; tensors equal up to the order of float64 sums. Ranks add the same
    per-batch float32 partials (each rank runs whole batches, the ones one process runs) in another order:
    the statistics differ by at most (batches - 1) * 2^-53 of their absolute sums, ~1e-15 relative; the ridge
    solve (ridge 0.3 of the mean diagonal) amplifies that by its condition number, far from the 2^-24 relative
    half-step of the float32 the re-fitted columns are rounded to: at most one rounding flips, one float32 step."""
    for key in ("kept_token_ids", "kept_channels", "sizes"):
        assert report(got)[key] == report(want)[key], f"{what}: {key} differ"
    a, b = tensors(got), tensors(want)
    assert sorted(a) == sorted(b), what
    for name in b:
        step = 2.0 ** -23
        assert_close(a[name], b[name], rtol=step, atol=step * float(b[name].abs().max()), what=f"{what}: {name}")


class Killed(BaseException):
    """A kill at a known point, in process (no handler of compact's catches it)."""


def kill_after(monkeypatch, layer: int) -> None:
    """The prune pass dies right after saving its checkpoint before `layer`."""
    save = runs.save

    def saving(checkpoints, group, next_layer, tensors, streams=None):
        save(checkpoints, group, next_layer, tensors, streams)
        if checkpoints.name.startswith("ffn-") and next_layer == layer:
            raise Killed

    monkeypatch.setattr(runs, "save", saving)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_killed_after_any_layer_resumes_to_the_same_bytes(tiny, tmp_path, monkeypatch, mode):
    """Killed after layer 0, in the middle and before the last layer, resumed each time: the uninterrupted
    run's checkpoint, byte for byte; the report's method is the plain run's (the sequential re-fit)."""
    root, args = tiny
    args = [*args, *MODES[mode]]
    assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
    out = tmp_path / "resumed"
    for layer in range(1, LAYERS):
        with monkeypatch.context() as patch:
            kill_after(patch, layer)
            with pytest.raises(Killed):
                cli.main([*args, "--out", str(out), "--checkpoint-every", "1", *(["--resume"] if layer > 1 else [])])
        assert not out.exists() and any((tmp_path / "resumed.ckpt").iterdir())
    assert cli.main([*args, "--out", str(out), "--checkpoint-every", "1"]) == 2, "no --resume: refused"
    assert cli.main([*args, "--out", str(out), "--checkpoint-every", "1", "--resume"]) == 0
    assert not (tmp_path / "resumed.ckpt").exists(), "a finished run removes its checkpoints"
    assert report(out)["options"]["refit"] == report(tmp_path / "plain")["options"]["refit"] \
        == "sequential"
    assert_same_prune(out, tmp_path / "plain", f"{mode}, resumed twice")


@pytest.mark.parametrize("mode", list(MODES))
def test_an_mlp_refit_killed_mid_run_resumes_to_the_same_bytes(tiny, tmp_path, monkeypatch, mode):
    """--refit mlp (the whole MLP reconstructed on the pruned stream), killed in the middle and resumed: the
    uninterrupted run's checkpoint, byte for byte, in memory and offloaded; the re-fitted gate/up rows travel
    in the checkpoint (the layers before the kill are not recomputed)."""
    root, args = tiny
    args = [*args, *MODES[mode], "--refit", "mlp"]
    assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
    out = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        kill_after(patch, 2)
        with pytest.raises(Killed):
            cli.main([*args, "--out", str(out), "--checkpoint-every", "1"])
    saved = [p for p in (tmp_path / "resumed.ckpt").iterdir() if p.name.startswith("ffn-")]
    state = load_file(str(saved[0] / "state.safetensors"))
    assert any(k.startswith("refit-gate/") for k in state), sorted(state)
    assert cli.main([*args, "--out", str(out), "--checkpoint-every", "1", "--resume"]) == 0
    assert report(out)["options"]["refit"] == "mlp"
    assert_same_prune(out, tmp_path / "plain", f"--refit mlp, {mode}, resumed")


def test_a_sigkilled_offloaded_run_resumes_to_the_same_bytes(tiny, tmp_path):
    """A real SIGKILL (no cleanup runs) in the middle of an offloaded prune, then --resume."""
    root, args = tiny
    args = [*args, *MODES["offload"], "--checkpoint-every", "1", "--out", str(tmp_path / "out")]
    killed = subprocess.run([sys.executable, os.path.join(HERE, "killed_run.py"), "2", *args], capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert cli.main([*args, "--resume"]) == 0
    assert cli.main([*tiny[1], *MODES["offload"], "--out", str(tmp_path / "plain")]) == 0
    assert_same_prune(tmp_path / "out", tmp_path / "plain", "offloaded, SIGKILLed")


def test_an_explicit_sequential_refit_is_accepted_with_checkpoints_and_resume(tiny, tmp_path):
    """--refit sequential with --checkpoint-every and --resume (nothing to resume yet: a fresh start) runs, and is
    the method the report records, as --refit auto's."""
    root, args = tiny
    assert cli.main([*args, "--refit", "sequential", "--checkpoint-every", "2", "--resume", "--out",
                     str(tmp_path / "out")]) == 0
    assert report(tmp_path / "out")["options"]["refit"] == "sequential"
    assert not (tmp_path / "out.ckpt").exists()


def test_checkpoints_refuse_other_arguments(tiny, tmp_path, monkeypatch):
    root, args = tiny
    out = ["--out", str(tmp_path / "out"), "--checkpoint-every", "1"]
    with monkeypatch.context() as patch:
        kill_after(patch, 2)
        with pytest.raises(Killed):
            cli.main([*args, *out])
    other = [a if a != "0.8" else "0.7" for a in args]
    assert cli.main([*other, *out, "--resume"]) == 2
    assert cli.main([*args, *out[:2], "--batch-size", "4", "--resume"]) == 2
    assert not (tmp_path / "out").exists()


def test_a_resume_is_refused_when_the_model_changed_in_place(tiny, tmp_path, monkeypatch, capsys):
    """The same path with other weights is another model: its checkpoint is refused, naming the model's files."""
    import shutil

    from safetensors.torch import save_file

    root, args = tiny
    shutil.copytree(root / "model", tmp_path / "model")
    args = [a if a != str(root / "model") else str(tmp_path / "model") for a in args]
    out = ["--out", str(tmp_path / "out"), "--checkpoint-every", "1"]
    with monkeypatch.context() as patch:
        kill_after(patch, 2)
        with pytest.raises(Killed):
            cli.main([*args, *out])
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    weights["model.layers.3.mlp.down_proj.weight"] *= 2
    save_file(weights, str(tmp_path / "model" / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert cli.main([*args, *out, "--resume"]) == 2
    assert "model files" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_streams_on_disk_give_the_same_bytes(tiny, tmp_path):
    """--host-memory 0: the streams live in a disk memmap, and the prune is the same to the byte."""
    root, args = tiny
    assert cli.main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "disk"), "--host-memory", "0"]) == 0
    assert_same_prune(tmp_path / "disk", tmp_path / "plain", "streams on disk")
    assert not (tmp_path / "disk.ckpt").exists(), "the streams' files are gone"


def test_no_rank_leaves_a_checkpoint_save_while_another_still_deletes(tmp_path, monkeypatch):
    """After a save each rank deletes its older checkpoints, then waits for the others: rank 0 removes the whole
    folder once the job is done, and its rmtree failed on a file rank 1 was deleting at that moment (a torchrun
    prune beside another test worker exited 2 with "No such file or directory: '...layer00003.rank1'")."""
    events = []

    class Rank1(runs.Group):
        def barrier(self):
            events.append("barrier")

    real_rmtree = runs.shutil.rmtree
    monkeypatch.setattr(runs.shutil, "rmtree", lambda path, **kw: (events.append(f"delete {Path(path).name}"),
                                                                    real_rmtree(path, **kw)))
    checkpoints = runs.Checkpoints(folder=str(tmp_path), every=1, name="ffn")
    for layer in (1, 2):
        runs.save(checkpoints, Rank1(rank=1, world=2), layer, {"x": torch.zeros(2)})
    deleted = events.index("delete ffn.layer00001.rank1")
    assert "barrier" in events[deleted:], events


def test_a_signal_while_a_checkpoint_writes_its_streams_stays_a_signal(tmp_path, monkeypatch):
    """SIGTERM's exception (cli.Terminated), raised while a checkpoint writes the streams, reaches the CLI as itself:
    numpy's `tofile` turned it into a TypeError when it landed in its flush, and the run exited 2, not 143."""
    from compact import streams

    saved = streams.Streams((2, 3, 4), torch.bfloat16, 1, where="host", device=torch.device("cpu"))

    class Interrupted:  # a file whose every write or flush is where the signal lands
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise cli.Terminated

        flush = write

        def fileno(self):
            raise cli.Terminated

    monkeypatch.setattr(streams, "open", Interrupted, raising=False)
    with pytest.raises(cli.Terminated):
        saved.save(tmp_path)


def test_the_engine_says_where_the_streams_live():
    model = tiny_models.build("llama")
    ids = torch.randint(0, tiny_models.VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    for limit, where in ((None, "host"), (0, "disk")):
        options = engine.EngineOptions(ScoringOptions(progress=False), refit="sequential", host_memory=limit)
        outcome = engine.run(engine.Resident(model), ids, None, options)
        assert outcome.streams.startswith(f"2 streams in {where}"), outcome.streams


# ------------------------------------------------------------------------------------------- torchrun

RANKS = textwrap.dedent("""
    import json, sys
    from compact import cli, runs

    class Killed(BaseException):
        pass

    save, leave = runs.save, runs.leave
    runs.leave = lambda: None  # one process group for every command of this script
    codes = []
    for command in json.loads(sys.argv[1]):
        def saving(checkpoints, group, next_layer, tensors, streams=None, kill=command["kill"]):
            save(checkpoints, group, next_layer, tensors, streams)  # (every rank has saved: a barrier)
            if checkpoints.name.startswith("ffn-") and next_layer == kill:
                raise Killed
        runs.save = saving
        try:
            codes.append(cli.main(command["args"]))
        except Killed:
            codes.append(0 if command["kill"] else 1)
    leave()
    sys.exit(max(codes))
""")


def torchrun(commands: list[dict], folder) -> None:
    """`commands` ({"args": compact's arguments, "kill": a layer to die before, or None}) in one
    `torchrun --nproc-per-node 2` launch."""
    script = folder / "ranks.py"
    script.write_text(RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*TWO_RANKS, str(script), json.dumps(commands)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory):
    """Two torchrun launches: one SIGKILLed in the middle of an in-memory prune (every rank dies; one may have
    saved a layer the other had not); then one running, as one process group: every family's tiny model pruned
    by the default method in memory and offloaded (beside the same prunes by one process, made here), the
    4-layer model's uninterrupted prunes, its prunes killed after layer 0, in the middle and before the last
    layer (every rank at the same point) and resumed each time, and the resume of the SIGKILLed one."""
    root = tmp_path_factory.mktemp("ranks")
    np.save(root / "calib.npy", np.random.default_rng(1).integers(0, tiny_models.VOCAB, size=(6, 24)))
    commands, families = [], []
    for case in tiny_models.CASES:
        tiny_models.build(case).save_pretrained(root / case)
        for mode, flags in MODES.items():
            args = ["prune", str(root / case), "--calib", str(root / "calib.npy"), "--samples", "6", "--seq-len",
                    "24", "--target-params", "0.85", "--ffn-multiple", "8", "--batch-size", "2", "--quiet", *flags]
            assert cli.main([*args, "--out", str(root / f"{case}-{mode}-1")]) == 0
            commands.append({"args": [*args, "--out", str(root / f"{case}-{mode}-2")], "kill": None})
            families.append((f"{case} {mode}", root / f"{case}-{mode}-2", root / f"{case}-{mode}-1"))
            if case in ("llama", "phi3") and mode == "memory":  # the whole MLP reconstructed: all-reduced steps
                mlp = [*args, "--refit", "mlp"]
                assert cli.main([*mlp, "--out", str(root / f"{case}-mlp-1")]) == 0
                commands.append({"args": [*mlp, "--out", str(root / f"{case}-mlp-2")], "kill": None})
                families.append((f"{case} --refit mlp", root / f"{case}-mlp-2", root / f"{case}-mlp-1"))
    _, args = tiny
    sigkilled = [*args, "--out", str(root / "sigkilled"), "--checkpoint-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([*TWO_RANKS, os.path.join(HERE, "killed_run.py"), "2", *sigkilled], capture_output=True,
                            text=True, env=env, timeout=300)
    assert killed.returncode != 0 and not (root / "sigkilled").exists(), killed.stderr[-2000:]
    resumed = [("memory, SIGKILLed in the middle", root / "sigkilled", root / "memory")]
    for mode, flags in MODES.items():
        out = [*args, *flags, "--out", str(root / f"{mode}-resumed"), "--checkpoint-every", "1"]
        commands.append({"args": [*args, *flags, "--out", str(root / mode)], "kill": None})
        commands += [{"args": [*out, *(["--resume"] if layer > 1 else [])], "kill": layer} for layer in (1, 2, 3)]
        commands.append({"args": [*out, "--resume"], "kill": None})
        resumed.append((f"{mode}, killed after layers 1, 2, 3", root / f"{mode}-resumed", root / mode))
    commands.append({"args": [*sigkilled, "--resume"], "kill": None})
    score = ["score", str(root / "llama"), "--calib", str(root / "calib.npy"), "--samples", "6", "--seq-len", "24",
             "--vocab-keep", "60", "--batch-size", "2", "--quiet"]
    assert cli.main([*score, "--out", str(root / "scores-1.safetensors")]) == 0
    commands.append({"args": [*score, "--out", str(root / "scores-2.safetensors")], "kill": None})
    torchrun(commands, root)
    return families, resumed, (root / "scores-2.safetensors", root / "scores-1.safetensors")


def test_two_ranks_prune_every_family_as_one_process(two_ranks):
    for what, two, one in two_ranks[0]:
        assert report(two)["options"]["refit"] == ("mlp" if "mlp" in what else "sequential"), what
        assert_prune_within_reduction_order(two, one, what)


def test_two_ranks_killed_anywhere_resume_to_the_same_bytes(two_ranks):
    for what, resumed, plain in two_ranks[1]:
        assert_same_prune(resumed, plain, f"2 ranks, {what}")
        assert not resumed.with_name(resumed.name + ".ckpt").exists(), what


def test_layerwise_prune_writes_the_in_memory_checkpoint(tiny, tmp_path):
    """--scores: the same bytes whether the pruned checkpoint is cut in memory or written tensor by tensor."""
    root, args = tiny
    scores = tmp_path / "scores.safetensors"
    assert cli.main(["score", str(root / "model"), "--calib", str(root / "calib.npy"), "--samples", "8",
                     "--seq-len", "32", "--vocab-keep", "60", "--quiet", "--out", str(scores)]) == 0
    common = ["prune", str(root / "model"), "--scores", str(scores), "--vocab-keep", "60", "--ffn-keep", "32",
              "--quiet"]
    assert cli.main(common + ["--out", str(tmp_path / "memory")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "layerwise"), "--offload", "layerwise"]) == 0
    assert_same_prune(tmp_path / "layerwise", tmp_path / "memory", "--scores, offloaded")


def test_two_ranks_score_as_one_process(two_ranks):
    """`compact score` under torchrun: the scores of one process, up to the order of float64 sums: each order of
    adding 3 batches' non-negative partials rounds twice, within 2 * 2^-53 of the score itself, so the two
    orders differ by at most 4 * 2^-53 of it."""
    two, one = (load_file(str(path)) for path in two_ranks[2])
    assert sorted(two) == sorted(one)
    for name, want in one.items():
        assert_close(two[name], want, rtol=4 * 2.0 ** -53, atol=0.0, what=name)
