"""The layer-major engine: the sequential re-fit against a direct least-squares solve, in-memory against
offloaded prunes with every re-fit, and one layer's statistics at a time."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import tiny_models
from compact import cli, engine, repair
from compact.scoring import ScoringOptions
from kernel_ops.tolerances import fp32_forward_rtol, fp32_sum_rtol
from memory_probe import PRELUDE
from test_layerwise_slicing import assert_same_checkpoint

KEEP = 20  # channels kept of tiny_models.INTER = 48


def _calibration(vocab: int, rows: int = 6, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    return ids, mask


def _capture(model, ids, mask, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(down_proj's input h, the MLP's residual out = layer output - MLP output, the layer output) of `layer`
    over the rows of `ids`, one sequence at a time, in float64."""
    decoder_layer = model.model.layers[layer]
    got = {"h": [], "mlp": [], "out": []}
    hooks = [decoder_layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: got["h"].append(a[0])),
             decoder_layer.mlp.register_forward_hook(lambda m, a, o: got["mlp"].append(o)),
             decoder_layer.register_forward_hook(lambda m, a, o: got["out"].append(o[0] if isinstance(o, tuple) else o))]
    try:
        with torch.no_grad():
            for row in range(ids.shape[0]):
                model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1])
    finally:
        for hook in hooks:
            hook.remove()
    h, mlp_out, out = (torch.cat([t.reshape(-1, t.shape[-1]) for t in got[k]]).double() for k in ("h", "mlp", "out"))
    return h, out - mlp_out, out


def test_sequential_refit_is_the_least_squares_solve_on_the_pruned_stream():
    """Each layer's re-fitted columns satisfy the normal equations of min sum_t w_t ||y_t - out'_t - W h'_t,K||^2
    + r ||W - W_K||^2, with h' and out' captured from the model pruned below that layer (as the engine's outcome
    says), y from the unpruned model, solved directly in float64. Checked by the backward error: the residual
    of the normal equations against the float32 arithmetic that built them."""
    model = tiny_models.build("llama", layers=3)
    ids, mask = _calibration(tiny_models.VOCAB)
    keep = list(range(0, tiny_models.VOCAB, 2))

    def top(stats):
        return engine.Choice(tuple(sorted(torch.topk(stats.scores, KEEP).indices.tolist())))

    options = engine.EngineOptions(ScoringOptions(keep_token_ids=keep, batch_size=2, progress=False),
                                   refit="sequential")
    outcome = engine.run(engine.Resident(model), ids, mask, options, top)
    pruned = tiny_models.build("llama", layers=3)
    weights = (torch.isin(ids, torch.tensor(keep)) & mask.bool()).double().reshape(-1, 1)  # padding weighs 0
    for layer in range(3):
        name = f"model.layers.{layer}.mlp"
        kept = torch.tensor(outcome.kept[name])
        y = _capture(model, ids, mask, layer)[2]
        h, residual, _ = _capture(pruned, ids, mask, layer)
        h_k = h[:, kept] * weights.sqrt()
        target = (y - residual) * weights.sqrt()
        w_k = pruned.model.layers[layer].mlp.down_proj.weight.detach().double()[:, kept]
        gram = h_k.T @ h_k
        damp = repair.RIDGE * gram.diagonal().mean()
        lhs = gram + damp * torch.eye(KEEP, dtype=torch.float64)
        rhs = target.T @ h_k + damp * w_k
        fitted = outcome.refits[name].down.double()
        # float32 sums over the calibration positions (G', C) and float32 forwards that round differently (the
        # engine's batches of 2 and index_select'ed down_proj, the model's single rows and zeroed columns)
        rtol = fp32_sum_rtol(ids.numel()) + fp32_forward_rtol(9 * (layer + 1), tiny_models.INTER)
        bound = rtol * (fitted.abs() @ lhs.abs() + rhs.abs())
        worst = float(((fitted @ lhs - rhs).abs() / bound).max())
        assert worst <= 1, f"{name}: normal-equation residual {worst:.3g} x its float32 bound"
        assert float((fitted - w_k).abs().max()) > 100 * rtol * float(w_k.abs().max()), "the re-fit moved nothing"
        with torch.no_grad():  # prune this layer as the engine did, before capturing the next
            down = pruned.model.layers[layer].mlp.down_proj.weight
            down[:, kept] = outcome.refits[name].down.to(down)
        _zero_dropped(pruned, layer, kept)


def _zero_dropped(model, layer: int, kept: torch.Tensor) -> None:
    """Dropping channels = zeroing their down_proj columns (what slicing removes contributes nothing)."""
    down = model.model.layers[layer].mlp.down_proj.weight
    dropped = torch.ones(down.shape[1], dtype=torch.bool)
    dropped[kept] = False
    with torch.no_grad():
        down[:, dropped] = 0


def _objective(weight, cross, gram, kept, ridge=repair.RIDGE) -> float:
    """sum_t ||r_t - W' h_t,K||^2 + r ||W' - W_K||^2 at the re-fit W' of the channels `kept`, up to the constant
    sum_t ||r_t||^2, from the Gram and cross term (the ridge r of the full Gram, as `eliminate` uses)."""
    damp = ridge * gram.diagonal().mean()
    lhs = gram[kept][:, kept] + damp * torch.eye(len(kept), dtype=torch.float64)
    rhs = cross[:, kept] + damp * weight[:, kept]
    fitted = torch.linalg.solve(lhs, rhs.T).T
    return float((fitted @ lhs * fitted).sum() - 2 * (fitted * rhs).sum())


def test_eliminate_drops_the_channel_whose_loss_the_refit_feels_least():
    """Greedy elimination by the OBS formula picks, at every step, the channel whose removal (the rest re-fitted)
    raises the least-squares objective least: the same choices as re-solving for every candidate."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(200, 9, generator=gen, dtype=torch.float64) @ torch.randn(9, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    target = h @ weight.T + 0.3 * torch.randn(200, 5, generator=gen, dtype=torch.float64)
    gram, cross = h.T @ h, target.T @ h
    alive = list(range(9))
    while len(alive) > 3:
        costs = {j: _objective(weight, cross, gram, [c for c in alive if c != j]) for j in alive}
        alive.remove(min(costs, key=costs.get))
    assert repair.eliminate(weight, cross, gram, 3, steps=6) == alive


@pytest.mark.parametrize("case", list(tiny_models.CASES))
def test_every_refit_offloaded_equals_in_memory(case, tmp_path, compute):
    """`compact prune` with a re-fit writes the same bytes whether the layers are resident or read from the
    files one at a time: the sequential re-fit (the default) for every family, and the same-input re-fit and
    the OBS selection for one."""
    model = tiny_models.build(case)
    src = tmp_path / "src"
    model.save_pretrained(src)
    np.save(tmp_path / "calib.npy", _calibration(tiny_models.VOCAB, rows=4, length=32)[0].numpy())
    np.save(tmp_path / "calib12.npy", _calibration(tiny_models.VOCAB, rows=12, length=32)[0].numpy())
    extras = [[]] + ([["--refit", "same-input"], ["--ffn-select", "obs"]] if case == "llama" else [])
    extras += [["--refit", "mlp"]] if case in ("llama", "phi3", "gemma2") else []
    for extra in extras:
        outs = []
        for mode in ([], ["--offload", "layerwise"]):
            out = tmp_path / f"out{len(outs)}"
            calib = tmp_path / ("calib12.npy" if "mlp" in extra else "calib.npy")  # (3 rows held out of 12)
            assert cli.main(["prune", str(src), "--out", str(out), "--overwrite", "--calib", str(calib),
                             "--seq-len", "32", "--ffn-keep", f"{KEEP}ch", "--quiet", *extra, *mode,
                             *compute.args]) == 0
            outs.append(out)
        report = json.loads((outs[1] / "compact_report.json").read_text())
        assert report["options"]["refit"] == (extra[1] if extra[:1] == ["--refit"] else "sequential")
        assert_same_checkpoint(outs[1], outs[0], f"{case} {' '.join(extra)}")
        if extra == ["--refit", "mlp"]:
            _assert_gate_up_refitted(src, outs[0], report["kept_channels"], case)


def _assert_gate_up_refitted(src, out, kept_channels: list, what: str) -> None:
    """--refit mlp changed some layer's kept gate/up rows (the reconstruction ran and won on held-out rows),
    and wrote them where the slice puts them (both halves of Phi-3's fused gate_up_proj)."""
    from safetensors.torch import load_file

    before = {k: v for f in src.glob("model*.safetensors") for k, v in load_file(str(f)).items()}
    after = {k: v for f in out.glob("model*.safetensors") for k, v in load_file(str(f)).items()}
    moved = 0
    for i, kept in enumerate(kept_channels):
        index = torch.tensor(kept)
        for name in [n for n in after if n.startswith(f"model.layers.{i}.mlp.") and ("gate" in n or "up_" in n)]:
            rows = torch.cat([index, index + tiny_models.INTER]) if "gate_up" in name else index
            moved += not torch.equal(after[name], before[name][rows])
    assert moved, f"{what}: --refit mlp left every kept gate/up row as it was"


MEMORY = PRELUDE + textwrap.dedent("""
    import os
    import transformers
    from dataclasses import replace
    from compact import engine, runs
    from compact.scoring import ScoringOptions
    model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    options = engine.EngineOptions(ScoringOptions(batch_size=1, progress=False), refit=sys.argv[2])
    half = tuple(range(model.config.intermediate_size // 2))
    group, figures = runs.group(), {}  # (under torchrun: 2 ranks of one batch each)
    for refit in ("none", "none", sys.argv[2]):  # the first run warms up torch's lazily built kernels and pools
        base = start()
        engine.run(engine.Resident(model), ids, None, replace(options, refit=refit), lambda stats: engine.Choice(half),
                   group=group)
        figures[refit] = (status()["VmHWM"] - base) / 2**20
    os.write(1, (json.dumps(figures) + "\\n").encode())  # one write: the ranks share the pipe, lines never interleave
    runs.leave()
""")


def _peak(tmp_path, refit: str, launcher: list[str]) -> None:
    """32 layers with 1024 channels: all layers' float64 Grams are 256 MiB, four times the 64 MiB this test
    allows the engine above its baseline (in every process); one layer's Gram is 8 MiB, its re-fit's working
    copies a few more."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc (Linux) to read the peak RSS")
    model = tiny_models.big_llama(intermediate=1024, vocab=64, layers=32, hidden=32)
    model.save_pretrained(tmp_path / "model")
    grams = 32 * 1024 ** 2 * 8 / 2**20
    script = tmp_path / "memory.py"
    script.write_text(MEMORY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*launcher, str(script), str(tmp_path / "model"), refit], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for line in (line for line in run.stdout.splitlines() if line.startswith("{")):
        figures = json.loads(line)
        peak = figures[refit]
        print(f"\n{refit}: all-layer Grams {grams:.0f} MiB; engine peak RSS above baseline {peak:.0f} MiB, "
              f"{figures['none']:.0f} MiB without a re-fit")
        assert grams > 64 > peak, f"the engine's peak {peak:.0f} MiB is not one layer's statistics"


@pytest.mark.slow  # peak RSS of its own fresh process: other tests beside it do not move it
@pytest.mark.parametrize("refit", ["same-input", "sequential"])
def test_statistics_live_for_one_layer(refit, tmp_path):
    _peak(tmp_path, refit, [sys.executable])


def test_statistics_live_for_one_layer_under_torchrun(tmp_path):
    """The same bound in each of 2 gloo ranks, whose statistics are all-reduced layer by layer."""
    _peak(tmp_path, "sequential", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])
