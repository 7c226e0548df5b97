"""--refit: the Gram matrices of the scoring pass and the least-squares re-fit of down_proj."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from compact import cli, evaluate, loading, repair
from compact.llama2c import load_llama2c
from compact.scoring import ChannelScorer, run_scorer
from kernel_ops.tolerances import assert_close, fp32_sum_rtol


def test_refit_is_the_least_squares_solution():
    """Without a ridge, the re-fitted columns are lstsq's answer to min ||H_K W'^T - H W^T|| (float64)."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(400, 6, generator=gen, dtype=torch.float64)  # correlated channels: what the repair uses
    h = latent @ torch.randn(6, 24, generator=gen, dtype=torch.float64)
    h += 0.01 * torch.randn(400, 24, generator=gen, dtype=torch.float64)
    weight = torch.randn(10, 24, generator=gen, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 11, 12, 19, 23])
    got = repair.refit(weight, h.T @ h, kept, ridge=0.0)
    want = torch.linalg.lstsq(h[:, kept], h @ weight.T).solution.T
    # normal equations (G = H^T H) lose cond(H_K)^2 * eps = 377^2 * 2.2e-16 = 3e-11 relative; QR less
    assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()), what="refit vs lstsq")
    before = (h @ weight.T - h[:, kept] @ weight[:, kept].T).norm()
    after = (h @ weight.T - h[:, kept] @ got.T).norm()
    assert after < 0.05 * before  # 8 kept channels span the 6-dimensional signal


def test_error_left_is_the_residual_of_the_refit():
    """error_left from the Gram alone equals the residual computed from the activations themselves."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(300, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 20, generator=gen, dtype=torch.float64)
    h += 0.3 * torch.randn(300, 20, generator=gen, dtype=torch.float64)
    weight = torch.randn(8, 20, generator=gen, dtype=torch.float64)
    kept = torch.tensor([1, 4, 5, 9, 10, 15, 17])
    dropped = torch.tensor([i for i in range(20) if i not in kept.tolist()])
    refit = repair.refit(weight, h.T @ h, kept)
    before = (h[:, dropped] @ weight[:, dropped].T).square().sum()
    after = (h @ weight.T - h[:, kept] @ refit.T).square().sum()
    got = repair.error_left(weight, h.T @ h, kept)
    # two float64 evaluations of sums of ~1e4 terms; the Gram form subtracts terms of the size of `before`
    assert abs(got - float(after / before)) <= 1e-9, (got, float(after / before))
    assert 0 < got < 0.5
    assert repair.error_left(weight, h.T @ h, torch.arange(20)) == 1.0


def test_gram_comes_from_the_scoring_pass(stories):
    """ChannelScorer(gram=True): sum_t w_t h_t h_t^T with the kept-vocabulary weights; its diagonal is the scores."""
    ckpt, calib, _ = stories
    model = load_llama2c(ckpt)
    ids = torch.from_numpy(np.load(calib))[:4]
    kept = list(range(300))
    captured = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    scorer = run_scorer(ChannelScorer(model, keep_token_ids=kept, gram=True, path="hooks"), ids, batch_size=2,
                        progress=False)
    handle.remove()
    h = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    w = torch.isin(ids, torch.tensor(kept)).reshape(-1, 1).double()
    want = (h * w).T @ h
    gram = scorer.grams["model.layers.0.mlp"]
    rtol = fp32_sum_rtol(ids.numel())  # float32 products summed over the batch's positions
    assert_close(gram, want, rtol=rtol, atol=rtol * float(want.abs().max()), what="gram")
    for name, scores in scorer.scores.items():
        diag = scorer.grams[name].diagonal()
        assert_close(diag, scores, rtol=rtol, atol=rtol * float(scores.abs().max()), what=f"{name} diagonal")


def test_refits_lower_held_out_loss(stories, tmp_path):
    """The same channels kept, with and without a re-fit: each re-fit predicts held-out text better than none."""
    ckpt, calib, heldout = stories
    ids = torch.from_numpy(np.load(heldout))
    nll, kept = {}, {}
    for refit in ("none", "same-input", "sequential"):
        out = tmp_path / refit
        assert cli.main(["prune", str(ckpt), "--out", str(out), "--ffn-keep", "96", "--ffn-multiple", "8",
                         "--calib", str(calib), "--quiet", "--refit", refit]) == 0
        kept[refit] = json.loads((out / "compact_report.json").read_text())["kept_channels"]
        total, count = evaluate.nll(loading.load(str(out), dtype="float32").model, ids, batch_size=6, progress=False)
        nll[refit] = total / count
    print("held-out NLL per token:", nll)
    assert kept["none"] == kept["same-input"] == kept["sequential"]
    assert nll["same-input"] < nll["none"] and nll["sequential"] < nll["none"]


def test_mlp_reconstruction_never_raises_held_out_nll(stories, tmp_path):
    """--refit mlp against the sequential re-fit it starts from, the same channels: held-out text (rows the
    calibration never saw) is predicted no worse, gate/up really moved, and two runs write the same bytes."""
    ckpt, calib, heldout = stories
    ids = torch.from_numpy(np.load(heldout))
    nll, kept, weights = {}, {}, {}
    for refit in ("sequential", "mlp", "mlp-again"):
        out = tmp_path / refit
        assert cli.main(["prune", str(ckpt), "--out", str(out), "--ffn-keep", "96", "--ffn-multiple", "8",
                         "--calib", str(calib), "--quiet", "--refit", refit.split("-")[0]]) == 0
        kept[refit] = json.loads((out / "compact_report.json").read_text())["kept_channels"]
        loaded = loading.load(str(out), dtype="float32")
        weights[refit] = {k: v.clone() for k, v in loaded.model.state_dict().items()}
        total, count = evaluate.nll(loaded.model, ids, batch_size=6, progress=False)
        nll[refit] = total / count
    print("held-out NLL per token:", nll)
    assert kept["sequential"] == kept["mlp"] == kept["mlp-again"]
    assert nll["mlp"] <= nll["sequential"], nll
    moved = [k for k in weights["mlp"] if ("gate_proj" in k or "up_proj" in k)
             and not torch.equal(weights["mlp"][k], weights["sequential"][k])]
    assert moved, "no gate/up row was re-fitted"
    for name, tensor in weights["mlp"].items():
        assert torch.equal(tensor.view(torch.uint8), weights["mlp-again"][name].view(torch.uint8)), name


def test_mlp_reconstruction_keeps_the_closed_form_without_held_out_rows(recwarn):
    """Fewer calibration rows than HOLD_OUT: none can be held out, so --refit mlp warns once and gives the
    sequential re-fit's columns, byte for byte."""
    import tiny_models
    from compact import engine
    from compact.scoring import ScoringOptions

    model = tiny_models.build("llama")
    ids = torch.randint(0, tiny_models.VOCAB, (repair.HOLD_OUT - 1, 16), generator=torch.Generator().manual_seed(0))
    options = engine.EngineOptions(ScoringOptions(batch_size=1, progress=False), refit="sequential")
    half = engine.Choice(tuple(range(0, tiny_models.INTER, 2)))
    want = engine.run(engine.Resident(model), ids, None, options, lambda stats: half)
    with pytest.warns(UserWarning, match="--refit mlp holds out") as caught:
        got = engine.run(engine.Resident(model), ids, None, replace(options, refit="mlp"), lambda stats: half)
    assert len([w for w in caught if "--refit mlp" in str(w.message)]) == 1
    for name, refit in want.refits.items():
        assert got.refits[name].gate is None and torch.equal(got.refits[name].down, refit.down), name


@pytest.mark.parametrize("extra", [["--ffn-criterion", "magnitude"], ["--ffn-select", "obs", "--refit", "none",
                                                                     "--ffn-criterion", "random"]])
def test_repair_needs_the_calibration_pass(stories, tmp_path, extra, capsys):
    ckpt, calib, _ = stories
    try:
        rc = cli.main(["prune", str(ckpt), "--out", str(tmp_path / "out"), "--ffn-keep", "0.5", "--calib", str(calib),
                       "--ffn-repair", *extra])
    except SystemExit as e:  # (--ffn-repair beside --refit none: a usage error)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "--refit" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_planner_prices_ffn_cuts_lower_with_repair(stories, capsys):
    """`compact plan --refit same-input`: the same candidates, each FFN loss scaled by the error share the re-fit
    leaves (in (0, 1]), so never above the plain planner's."""
    ckpt, calib, _ = stories
    losses = {}
    for extra in (["--refit", "none"], ["--refit", "same-input"]):
        assert cli.main(["plan", str(ckpt), "--calib", str(calib), "--target-params", "0.8", "--ffn-multiple", "4",
                         *extra]) == 0
        table = capsys.readouterr().out.split("\n\n")[1].splitlines()[2:]
        losses[extra[1] != "none"] = {row.split()[-6]: float(row.split()[-2]) for row in table}  # FFN keep -> score loss
    assert losses[True].keys() == losses[False].keys()
    assert all(losses[True][k] <= losses[False][k] for k in losses[False])
    assert any(losses[True][k] < 0.9 * losses[False][k] for k in losses[False])


@pytest.mark.parametrize("case", ["llama", "phi3"])
@pytest.mark.parametrize("refit", ["same-input", "sequential", "mlp"])
def test_a_nan_among_the_dropped_weights_never_reaches_the_output(case, refit, tmp_path):
    """One NaN in a down_proj column the cut drops (of the last layer: in an earlier one it would make every later
    layer's act^2 NaN, which selection refuses in one line): the least-squares re-fit would mix it into every kept
    column. The layer keeps its weights as they are, with a warning naming it; the pruned model's logits are
    finite."""
    import tiny_models
    import compact

    model = tiny_models.build(case)
    np.save(tmp_path / "calib.npy", (np.arange(8 * 32).reshape(8, 32) * 7) % tiny_models.VOCAB)
    calib = compact.CalibOptions(str(tmp_path / "calib.npy"), samples=8, seq_len=32)
    method = compact.Method(ffn_keep=f"{tiny_models.INTER // 2}ch", refit=refit)
    plain = compact.decide(model, None, calib, replace(method, refit="none"), compact.Run(progress=False))
    kept = plain.kept_channels["model.layers.1.mlp"]
    column = next(j for j in range(tiny_models.INTER) if j not in kept)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, column] = float("nan")
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.mlp: the re-fit is not finite"):
        decision = compact.decide(model, None, calib, method, compact.Run(progress=False))
    assert decision.kept_channels["model.layers.1.mlp"] == kept
    assert "model.layers.1.mlp" not in decision.refits
    compact.apply(model, None, decision)
    assert bool(model(torch.from_numpy(np.load(tmp_path / "calib.npy"))).logits.isfinite().all())


def test_a_nan_among_the_kept_weights_is_one_line(tmp_path):
    """A NaN the cut keeps would reach the output whatever the re-fit: refused, naming the layer."""
    import tiny_models
    import compact

    model = tiny_models.build("qwen2")
    np.save(tmp_path / "calib.npy", (np.arange(4 * 32).reshape(4, 32) * 7) % tiny_models.VOCAB)
    calib = compact.CalibOptions(str(tmp_path / "calib.npy"), samples=4, seq_len=32)
    method = compact.Method(ffn_keep=f"{tiny_models.INTER // 2}ch", refit="sequential")
    kept = compact.decide(model, None, calib, replace(method, refit="none"),
                          compact.Run(progress=False)).kept_channels["model.layers.0.mlp"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, kept[0]] = float("inf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: the kept channels' weights hold NaN or inf"):
        compact.decide(model, None, calib, method, compact.Run(progress=False))


def test_a_nan_among_the_dropped_weights_offloaded(tmp_path):
    """The same through the CLI with --offload layerwise (the weights read layer by layer from the files): exit
    0, the layer named in a warning, finite logits from the written checkpoint."""
    import tiny_models

    model = tiny_models.build("mistral")
    np.save(tmp_path / "calib.npy", (np.arange(8 * 32).reshape(8, 32) * 7) % tiny_models.VOCAB)
    args = ["--ffn-keep", f"{tiny_models.INTER // 2}ch", "--calib", str(tmp_path / "calib.npy"), "--samples", "8",
            "--seq-len", "32", "--quiet"]
    model.save_pretrained(tmp_path / "model")
    assert cli.main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "plain"), "--refit", "none",
                     *args]) == 0
    kept = json.loads((tmp_path / "plain" / "compact_report.json").read_text())["kept_channels"][1]
    column = next(j for j in range(tiny_models.INTER) if j not in kept)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, column] = float("nan")
    model.save_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.mlp: the re-fit is not finite"):
        assert cli.main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--refit", "sequential",
                         "--offload", "layerwise", *args[:-1]]) == 0  # (not --quiet: it silences warnings)
    pruned = loading.load(str(tmp_path / "out"), dtype="float32").model
    assert bool(pruned(torch.from_numpy(np.load(tmp_path / "calib.npy"))).logits.isfinite().all())
