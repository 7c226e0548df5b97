"""bench/: the scripts' no-GPU exit, the measure/CSV/plot loop on CPU with a fake timer (nothing timed), and
bench/calibration.py end to end on a tiny shape. The scripts are loaded from their files or run as processes,
never imported through sys.path."""
import csv
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(BENCH.glob("bench_*.py"))


def load(name: str, monkeypatch):
    """bench/<name>.py loaded from its file, registered under the name the other scripts import it by
    (undone after the test)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch):
    """The bench modules, dependencies first (common imports plot); torch.compile without Inductor."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    plot, common = load("plot", monkeypatch), load("common", monkeypatch)
    return common, plot, load("bench_scores", monkeypatch), load("bench_gather", monkeypatch)


@pytest.fixture
def fake_timer(bench, monkeypatch):
    """common.time_ms that runs fn once and reports 2 ms (median), 1 ms (p20), 3 ms (p80)."""
    common = bench[0]

    def time_ms(fn):
        fn()
        return 2.0, 1.0, 3.0
    monkeypatch.setattr(common, "time_ms", time_ms)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_without_gpu_exits_0_and_says_so(script, tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"bench/{script.name}: needs a CUDA GPU; nothing measured" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_peak_bandwidth_table(bench):
    common = bench[0]
    assert common.peak_gbps("NVIDIA H200") == 4800
    assert common.peak_gbps("NVIDIA H100 80GB HBM3") == 3350
    assert common.peak_gbps("NVIDIA A100-SXM4-80GB") == 2039
    assert common.peak_gbps("NVIDIA A100-SXM4-40GB") == 1555
    assert common.peak_gbps("NVIDIA GeForce RTX 4090") is None


def test_full_and_quick_case_lists(bench, capsys):
    _, _, scores, gather = bench
    full = list(scores.cases(**scores.FULL))
    assert len(full) == 2 * 9 + 3 and len(list(scores.cases(**scores.QUICK))) < len(full)
    biggest = max(c.nbytes for c in full if c.op == "glu_and_score")
    assert biggest == 3 * 65536 * 28672 * 2 + 65536 * 4
    assert [c.op for c in gather.cases(gather.FULL)] == ["gather_rows", "gather_rows", "gather_cols"]
    assert not scores.fits(1 << 20, 1 << 15) and "skip" in capsys.readouterr().out


def test_run_bench_on_cpu_writes_csv_and_png(bench, fake_timer, tmp_path):
    pytest.importorskip("matplotlib")
    common, _, scores, gather = bench
    cases = [*scores.cases(widths=(8, 20), tokens=(4, 33), device="cpu"),
             *gather.cases([((50, 12), 0), ((6, 40), 1)], device="cpu")]
    assert common.run_bench("fake", cases, tmp_path) == 0
    rows = read_rows(tmp_path / "fake.csv")
    impls = {(r["op"], r["impl"]) for r in rows}
    assert {("channel_scores", "torch_compile"), ("glu_and_score", "torch_glu_only"), ("token_weights", "triton"),
            ("gather_rows", "indexing"), ("gather_cols", "index_select")} <= impls
    assert len(rows) == 4 * 3 + 4 * 5 + 2 * 2 + 2 * (3 + len(gather.CONFIGS))
    first = rows[0]
    assert first["ms_median"] == "2" and first["ms_p20"] == "1" and first["ms_p80"] == "3"
    assert float(first["gbps"]) == pytest.approx(int(first["bytes"]) / 2e-3 / 1e9, abs=0.05)
    assert first["pct_peak"] == first["peak_gbps"] == "unknown" and first["device"] == "cpu"
    assert first["torch"] == torch.__version__ and not first["note"]
    assert (tmp_path / "fake.png").stat().st_size > 0


def test_failed_impl_is_a_row_with_a_note(bench, fake_timer, tmp_path, capsys):
    common = bench[0]

    def boom():
        raise RuntimeError("CUDA out of memory\nmore detail")
    case = common.Case("op", "1x1", 10, lambda: {"ok": lambda: None, "bad": boom})
    no_inputs = common.Case("op", "2x2", 10, lambda: boom())
    assert common.run_bench("fail", [case, no_inputs], tmp_path, make_plot=False) == 2
    rows = read_rows(tmp_path / "fail.csv")
    assert [(r["impl"], r["note"]) for r in rows] == [
        ("ok", ""), ("bad", "RuntimeError: CUDA out of memory"), ("inputs", "RuntimeError: CUDA out of memory")]
    assert rows[1]["ms_median"] == rows[1]["gbps"] == ""
    assert "FAILED RuntimeError" in capsys.readouterr().out
    assert not (tmp_path / "fail.png").exists()


def test_plot_fake_rows_with_peak_and_failures(bench, tmp_path):
    pytest.importorskip("matplotlib")
    common, plot = bench[0], bench[1]
    path = tmp_path / "fake.csv"
    rows = [{"op": op, "impl": impl, "shape": shape, "dtype": "bfloat16", "gbps": gbps, "peak_gbps": "4800.0",
             "device": "NVIDIA H200", "note": ""}
            for op in ("a", "b") for impl, gbps in (("triton", "4000"), ("torch", "")) for shape in ("1x2", "3x4")]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, common.FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    assert plot.plot_csv(path) == tmp_path / "fake.png"
    assert (tmp_path / "fake.png").stat().st_size > 0


def test_plot_skipped_without_measured_rows(bench, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    common, plot = bench[0], bench[1]
    path = tmp_path / "empty.csv"
    path.write_text(",".join(common.FIELDS) + "\n")
    assert plot.plot_csv(path) is None and "no measured rows" in capsys.readouterr().out
    assert not (tmp_path / "empty.png").exists()


def test_plot_skipped_without_matplotlib(bench, tmp_path, monkeypatch, capsys):
    plot = bench[1]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert plot.plot_csv(tmp_path / "any.csv") is None
    assert "matplotlib is not installed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ bench/calibration.py

def run_calibration(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "calibration.py"), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_calibration_bench_in_process(tmp_path):
    """The in-process loop (the GPU path's, here on the CPU) on a tiny shape: rows, agreement, CSV, PNG."""
    proc = run_calibration("--device", "cpu", "--in-process", "--shapes", "tiny-llama", "--repeats", "2",
                           "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    rows = read_rows(tmp_path / "calibration_cpu.csv")
    assert [r["variant"] for r in rows] == ["hooks_full_forward", "score_channels"]
    ours = rows[-1]
    assert ours["agree"] == "True" and float(ours["max_rel_diff_layer"]) <= 1e-6, ours
    assert len(ours["speedups"].split()) == 2 and float(ours["speedup_median"]) > 0
    assert ours["tokens"] == str(4 * 32) and "one process for both variants" in ours["memory"]
    runs = read_rows(tmp_path / "calibration_cpu_runs.csv")
    assert [(r["pair"], r["variant"]) for r in runs] == [("0", "hooks_full_forward"), ("0", "score_channels"),
                                                         ("1", "score_channels"), ("1", "hooks_full_forward")]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "calibration_cpu.png").stat().st_size > 0


def test_calibration_bench_without_gpu(tmp_path):
    proc = run_calibration("--device", "cuda", "--out", str(tmp_path), env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "needs a CUDA GPU; nothing measured" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_gpu_product_dry_runs_every_step_on_the_cpu(tmp_path):
    """bench/gpu_product.py --dry: every step of the GPU session's product script, on a tiny model on the CPU, so
    that a lent GPU's minutes are never spent finding a typo. (The torchrun step, two `compact prune` runs under
    torchrun, four fresh torch processes and ~42 s here, runs in `python bench/gpu_product.py --dry`; its code
    path is tests/test_runs.py's.)"""
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_product.py"), "--dry", "--out", str(out),
                           "--work", str(work), "--skip", "torchrun"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    steps = read_rows(out / "gpu_product_steps.csv")
    assert [r["step"] for r in steps] == ["checkpoint", "prune", "layerwise", "speed", "utilisation", "torchrun"]
    assert [r["rc"] for r in steps] == ["0"] * 5 + ["skipped"], steps
    phases = {r["phase"]: r for r in read_rows(out / "gpu_product_prune.csv")}
    assert {"calibration", "planning", "scoring", "scoring: re-fit", "slicing", "save"} <= set(phases)
    assert phases["end to end, load excluded"]["refit"] == "sequential"
    speed = read_rows(out / "gpu_product_speed.csv")
    assert [r["model"] for r in speed] == ["original", "pruned 0.65", "pruned / original"]
    assert float(speed[2]["weight_gib"]) < 1
    utilisation = read_rows(out / "gpu_product_utilisation.csv")
    assert any("compile" in r["variant"] and not r.get("error") for r in utilisation), utilisation
    assert read_rows(out / "gpu_product_layerwise.csv")[0]["estimated_70b_s"]
