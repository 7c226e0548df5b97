"""FFN criteria at equal budget on the real stories260K model, and their formulas."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compact import cli, criteria, evaluate, loading, models
from compact.llama2c import load_llama2c
from compact.options import CRITERIA
from compact.scoring import ChannelScorer, run_scorer, score_channels
from kernel_ops.tolerances import assert_close, decoder_rtol, fp32_sum_rtol


@pytest.fixture(scope="module")
def pruned_by_criterion(stories, tmp_path_factory):
    ckpt, calib, heldout = stories
    root = tmp_path_factory.mktemp("criteria")
    ids = torch.from_numpy(np.load(heldout))
    nll = {}
    for name in CRITERIA:
        out = root / name
        assert cli.main(["prune", str(ckpt), "--out", str(out), "--ffn-keep", "128", "--ffn-criterion", name,
                         "--calib", str(calib), "--quiet"]) == 0
        model = loading.load(str(out), dtype="float32", device="cpu").model
        total, count = evaluate.nll(model, ids, batch_size=6, progress=False)
        nll[name] = total / count
    return root, nll


def test_every_criterion_runs_end_to_end(pruned_by_criterion):
    root, nll = pruned_by_criterion
    for name in CRITERIA:
        report = json.loads((root / name / "compact_report.json").read_text())
        assert report["ffn_criterion"] == name and report["sizes"]["intermediate_after"] == 128
        assert np.isfinite(nll[name])


def test_activation_criteria_beat_random_and_magnitude(pruned_by_criterion):
    _, nll = pruned_by_criterion
    print("held-out NLL per token:", {k: round(v, 4) for k, v in nll.items()})
    for good in ("common-act2", "act2"):
        for bad in ("random", "magnitude"):
            assert nll[good] < nll[bad], f"{good} {nll[good]:.4f} should beat {bad} {nll[bad]:.4f}"


def test_one_pass_gives_common_and_plain_act2(stories):
    ckpt, calib, _ = stories
    model = load_llama2c(ckpt)
    ids = torch.from_numpy(np.load(calib))[:4]
    kept = list(range(300))
    scorer = run_scorer(ChannelScorer(model, keep_token_ids=kept, plain=True), ids, batch_size=2, progress=False)
    common, plain = scorer.scores, scorer.plain_scores
    ref_common = score_channels(model, ids, keep_token_ids=kept, batch_size=2, progress=False)
    ref_plain = score_channels(model, ids, batch_size=2, progress=False)
    rtol = decoder_rtol(model.config, ids.shape[1])  # two decoder passes that may round differently
    for name in common:
        for got, want in ((common[name], ref_common[name]), (plain[name], ref_plain[name])):
            assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), what=name)
        assert (common[name] <= plain[name] * (1 + fp32_sum_rtol(ids.numel()))).all()


def test_criterion_formulas(stories):
    ckpt, _, _ = stories
    model = load_llama2c(ckpt)
    plain = {f"model.layers.{i}.mlp": torch.rand(172, dtype=torch.float64) for i in range(5)}
    wanda = {name: criteria.layer_scores(SimpleNamespace(mlp=mlp, plain=plain[name]), "wanda")
             for name, mlp in models.mlps(model).items()}
    magnitude = criteria.data_free_scores(model, "magnitude")
    for i, layer in enumerate(model.model.layers):
        name, mlp = f"model.layers.{i}.mlp", layer.mlp
        down = mlp.down_proj.weight.double()
        assert torch.allclose(wanda[name], down.abs().sum(0) * plain[name].sqrt())
        norms = (down.square().sum(0) + mlp.gate_proj.weight.double().square().sum(1)
                 + mlp.up_proj.weight.double().square().sum(1)).sqrt()
        assert torch.allclose(magnitude[name], norms)
    first, again = criteria.data_free_scores(model, "random", 3), criteria.data_free_scores(model, "random", 3)
    other = criteria.data_free_scores(model, "random", 4)
    assert all(torch.equal(first[n], again[n]) and not torch.equal(first[n], other[n]) for n in first)


def test_score_command_writes_the_chosen_criterion(stories, tmp_path):
    ckpt, calib, _ = stories
    out = tmp_path / "wanda.safetensors"
    assert cli.main(["score", str(ckpt), "--calib", str(calib), "--ffn-criterion", "wanda", "--out", str(out),
                     "--quiet"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ffn_criterion"] == "wanda"
    assert len(load_file(str(out))) == 5
    with pytest.raises(SystemExit):
        cli.main(["score", str(ckpt), "--calib", str(calib), "--ffn-criterion", "nope", "--out", str(out)])
