"""Writing results safely: into a temporary sibling folder or file, renamed into place only when complete.

Nothing the user owns is ever destroyed: `--overwrite` replaces only an output that compact wrote (a folder
with a `.compact-output` marker or a `compact_report.json`, a scores file whose metadata says compact), never
the source model, the working directory or a folder above either. The staging folder is locked (flock) while
its run lives, so a later run into the same parent can tell a folder left by a killed run from one in use,
and removes only the former.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

MARKER = ".compact-output"  # written into every folder compact produces
STAGE_NAME = re.compile(r"\.compact\.[0-9a-f]{10}\.[A-Za-z0-9_]+\.(?:partial|old)")  # see _stage_prefix
SCORES_TAG = "compact_scores"  # metadata key of every scores file compact writes


def _check_writable(out: Path, what: str) -> None:
    """The folder the output is staged in and renamed into must take new entries (checked before any work)."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {out}: {parent} is not writable")


def check_destination(out: Path, *, overwrite: bool, protected: Path | None = None, what: str = "--out",
                      kind: str = "dir") -> None:
    """Refuse, before any work, a destination compact must not write: the source (or a folder inside or
    above it), the working directory or one above it, a folder where a file goes (or the reverse), an
    existing non-empty one without `overwrite`, or one compact did not write."""
    out = Path(out)
    dst = out.resolve()
    cwd = Path.cwd().resolve()
    if dst == cwd or dst in cwd.parents:
        raise ValueError(f"{what} {out} is the working directory or above it; name a new folder")
    if protected is not None:
        src = Path(protected).resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            raise ValueError(f"{what} {out} overlaps the source model {protected}; choose another place")
    _check_writable(out, what)
    if not out.exists():
        if out.is_symlink():
            raise ValueError(f"{what} {out} is a broken symbolic link")
        return
    if kind == "file" and out.is_dir():
        raise ValueError(f"{what} {out} is a directory; the scores go into a file (e.g. {out}/scores.safetensors)")
    if kind == "dir" and not out.is_dir():
        raise ValueError(f"{what} {out} is a file; name a folder")
    empty = out.is_dir() and not any(out.iterdir())
    if empty:
        return
    if not overwrite:
        raise ValueError(f"{what} {out} exists and is not empty; pass --overwrite to replace it")
    if not written_by_compact(out):
        raise ValueError(f"{what} {out} exists and was not written by compact; --overwrite replaces only "
                         "compact's own outputs: remove it yourself or choose another place")


def written_by_compact(path: Path) -> bool:
    """A folder compact produced (its marker, or a compact_report.json), or a scores file compact wrote."""
    path = Path(path)
    if path.is_dir():
        return (path / MARKER).is_file() or (path / "compact_report.json").is_file()
    try:
        with safe_open(str(path), framework="pt") as f:
            return SCORES_TAG in (f.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return False


def _stage_prefix(out: Path) -> str:
    """Short, fixed per destination: staging names stay valid for any --out name and are found again."""
    return f".compact.{hashlib.sha1(out.name.encode()).hexdigest()[:10]}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _flock(folder: Path, wait: bool = True):
    """Hold an exclusive flock on `folder` for the block; yields False, holding nothing, when `wait` is False
    and a live run holds it (the kernel drops a killed run's lock)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        os.close(fd)


def remove_stale(out: Path) -> list[Path]:
    """Remove the staging folders that earlier runs into `out`'s parent left and no live process holds (killed
    runs, whatever their --out); warn, naming them. An output that a killed `--overwrite` run had moved aside
    (into a `.old` folder) and not replaced is put back first."""
    removed, restored = [], []
    for path in sorted(out.parent.glob(".compact.*")):
        if not STAGE_NAME.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
            continue  # only compact's own staging names
        with _flock(path, wait=False) as ours:
            if not ours:
                continue  # another run is writing it
            restored += _put_back(path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if restored:
        warnings.warn(f"put back {', '.join(restored)} in {out.parent}: an interrupted --overwrite run had moved "
                      "it aside", stacklevel=2)
    if removed:
        warnings.warn(f"removed {len(removed)} unfinished folder(s) that interrupted runs left in {out.parent} "
                      f"({', '.join(p.name for p in removed)})", stacklevel=2)
    return removed


def _put_back(stage: Path) -> list[str]:
    """The names moved back from a `.old` staging folder whose output was never replaced (see _replace)."""
    if not stage.name.endswith(".old"):
        return []
    entries = list(stage.iterdir())
    if len(entries) != 1 or os.path.lexists(stage.parent / entries[0].name):
        return []
    os.rename(entries[0], stage.parent / entries[0].name)
    return [entries[0].name]


@contextmanager
def staged_dir(out: Path, *, overwrite: bool):
    """Yield a locked temporary folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(os.path.realpath(out))  # a symbolic link --out: write where it points
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_stage_prefix(out), suffix=".partial", dir=out.parent))
    try:
        with _flock(tmp):
            yield tmp
            (tmp / MARKER).write_text("written by compact; `--overwrite` may replace this folder\n")
            _follow_umask(tmp)
            _replace(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _follow_umask(folder: Path) -> None:
    """`folder` and all in it with the modes the umask gives new files and folders: mkdtemp, mkstemp and
    save_pretrained's safetensors writer make them private (0700, 0600)."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM held back during the block and raised after it, so a swap is never cut in half.

    Held by a recording handler, not by the thread's signal mask: any thread may receive a signal, and Python
    runs its handler in the main thread whichever did. Elsewhere nothing interrupts the block anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]  # None: set in C
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in caught:
            signal.raise_signal(sig)


def _replace(new: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder `new` to `out`, replacing compact's earlier output there (checked again).

    The old output is moved aside into a `.old` folder, then `new` into place, with signals held; a run killed
    in between (SIGKILL) leaves the `.old` folder, which the next run's remove_stale puts back."""
    check_destination(out, overwrite=overwrite)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=_stage_prefix(out), suffix=".old", dir=out.parent))
    with _flock(old), _signals_held():  # a concurrent run's remove_stale leaves it alone while we swap
        os.rename(out, old / out.name)
        try:
            os.rename(new, out)
        except OSError:
            os.rename(old / out.name, out)
            raise
        shutil.rmtree(old, ignore_errors=True)


def save_scores(scores: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                *, overwrite: bool = False) -> None:
    """A scores file: one float64 [I] tensor per layer named model.layers.{i}.mlp, written atomically.

    The metadata (with compact's tag) is written in sorted key order, so identical runs give identical bytes."""
    path = Path(os.path.realpath(path))
    check_destination(path, overwrite=overwrite, kind="file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_stage_prefix(path), suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        meta = {SCORES_TAG: "1", **(metadata or {})}
        save_file({k: v.detach().cpu().contiguous() for k, v in scores.items()}, tmp, metadata=meta)
        _sort_metadata(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its keys in sorted order (same length: only the order changes)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        new = json.dumps(dict(sorted(header.items())), separators=(",", ":")).encode()
        if len(new) > size:
            raise RuntimeError(f"{path}: sorted safetensors header grew ({len(new)} > {size} bytes)")
        f.seek(8)
        f.write(new + b" " * (size - len(new)))


def load_scores(path: Path, expected: dict[str, int], fingerprint: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Scores from a file, checked against the model's {mlp name: intermediate size} (exactly those layers)
    and, when the file records one, the model's shape fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = f.metadata() or {}
        scores = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"scores file {path} is not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - set(scores), key=_layer_order)
    if missing:
        raise ValueError(f"scores file {path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    extra = sorted(set(scores) - set(expected), key=_layer_order)
    if extra:
        raise ValueError(f"scores file {path} has {len(scores)} layers, the model {len(expected)} "
                         f"(e.g. {extra[0]}): scores of another model?")
    for name, size in expected.items():
        if scores[name].shape != (size,):
            raise ValueError(f"scores file {path}: {name} has shape {tuple(scores[name].shape)}, the model needs ({size},)")
    for key, value in (fingerprint or {}).items():
        if key in recorded and recorded[key] != value:
            raise ValueError(f"scores file {path} was computed for a model with {key} {recorded[key]}, "
                             f"this one has {value}: scores of another model?")
    return {name: scores[name].double() for name in expected}


def _layer_order(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
