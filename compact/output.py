"""Writing results safely: into a temporary sibling folder or file, renamed into place only when complete."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def check_destination(out: Path, *, overwrite: bool, protected: Path | None = None, what: str = "--out") -> None:
    """Refuse (before any work) an existing non-empty destination without overwrite, or one holding the source."""
    out = Path(out)
    if protected is not None:
        src, dst = Path(protected).resolve(), out.resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            raise ValueError(f"{what} {out} overlaps the source model {protected}; choose another folder")
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise ValueError(f"{what} {out} exists and is not empty; pass --overwrite to replace it")


@contextmanager
def staged_dir(out: Path, *, overwrite: bool):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        _replace(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _replace(new: Path, out: Path, overwrite: bool) -> None:
    check_destination(out, overwrite=overwrite)
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.old")
    os.rename(out, old)
    os.rename(new, out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def save_scores(scores: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                *, overwrite: bool = False) -> None:
    """A scores file: one float64 [I] tensor per layer named model.layers.{i}.mlp, written atomically."""
    path = Path(path)
    check_destination(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in scores.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_scores(path: Path, expected: dict[str, int]) -> dict[str, torch.Tensor]:
    """Scores from a file, checked against the model's {mlp name: intermediate size}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scores file {path} not found")
    scores = load_file(str(path))
    missing = sorted(set(expected) - set(scores), key=_layer_order)
    if missing:
        raise ValueError(f"scores file {path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for name, size in expected.items():
        if scores[name].shape != (size,):
            raise ValueError(f"scores file {path}: {name} has shape {tuple(scores[name].shape)}, the model needs ({size},)")
    return {name: scores[name].double() for name in expected}


def _layer_order(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
