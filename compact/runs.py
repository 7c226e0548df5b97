"""Runs that span processes or outlive one: torchrun's process group and the engine's per-layer checkpoints.

Under `torchrun --nproc-per-node N -m compact ...` every rank takes a contiguous share of the calibration
batches through the layer-major engine (compact.engine); per layer the statistics are all-reduced, rank 0
chooses and re-fits and broadcasts the result, and only rank 0 writes. NCCL on GPUs, gloo on CPUs.

Checkpoints: every `every` layers the engine saves what the next layer needs (the sums so far, each done
layer's choice and re-fit, the streams at the layer boundary) into `FOLDER/{pass}.layer{L}.rank{R}/` (written
under a temporary name, then renamed); the previous one is removed once every rank holds the new one, so a kill
at any point leaves a layer that every rank saved. `resume` continues from it and refuses a checkpoint made
with other arguments. A pass that finished keeps a last checkpoint without streams, so a resumed job skips it;
the job removes the folder once its output is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class Group:
    """This process's place among torchrun's ranks (`world` 1: alone)."""

    rank: int = 0
    world: int = 1

    def share(self, batches: int) -> slice:
        """The contiguous block of `batches` batches this rank runs."""
        return slice(batches * self.rank // self.world, batches * (self.rank + 1) // self.world)

    def all_reduce(self, tensor: torch.Tensor | None) -> None:
        """`tensor` replaced by its sum over the ranks, in place."""
        if self.world > 1 and tensor is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast(self, value):
        """Rank 0's `value` (a small picklable)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensor(self, tensor: torch.Tensor) -> None:
        """`tensor` set to rank 0's, in place."""
        if self.world > 1:
            dist.broadcast(tensor, src=0)

    def smallest(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        if self.world == 1:
            return value
        box = torch.tensor([value], dtype=torch.int64)
        if dist.get_backend() == "nccl":
            box = box.cuda()
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        return int(box.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def group() -> Group:
    """This process's group; joins torchrun's process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Group()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Group(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    """Leave torchrun's process group, when this process joined one: a gloo group left to the interpreter's exit
    can abort it ("terminate called without an active exception": 3 runs in 14 of the 2-rank test here)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Checkpoints:
    """Where and when a job's engine passes save resume checkpoints: `folder` (None: never), every `every`
    layers (0: never), continued with `resume`; `signature` (JSON) is what a checkpoint must have been made
    with; `name` the pass (a job runs several: planning, trials, the prune)."""

    folder: str | None = None
    every: int = 0
    resume: bool = False
    signature: str = "{}"
    name: str = "pass"

    @property
    def saving(self) -> bool:
        return self.folder is not None and self.every > 0

    def named(self, name: str) -> "Checkpoints":
        return replace(self, name=name)


@dataclass(frozen=True)
class Saved:
    """A checkpoint read back: the next layer to run, its tensors and the folder holding its streams."""

    next_layer: int
    tensors: dict[str, torch.Tensor]
    folder: Path


_NAME = re.compile(r"(?P<name>.+)\.layer(?P<layer>\d+)\.rank(?P<rank>\d+)$")


def _layers(checkpoints: Checkpoints, rank: int) -> dict[int, Path]:
    """This rank's complete checkpoints of the pass, by next layer."""
    folder = Path(checkpoints.folder)
    found = {}
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _NAME.match(path.name)
        if match and match["name"] == checkpoints.name and int(match["rank"]) == rank:
            found[int(match["layer"])] = path
    return found


def save(checkpoints: Checkpoints, group_: Group, next_layer: int, tensors: dict[str, torch.Tensor],
         streams=None) -> None:
    """A checkpoint of this rank before layer `next_layer`: `tensors` and `streams` (a compact.streams.Streams,
    or None), atomically; then, once every rank holds it, the older ones go, and every rank waits until all are gone."""
    folder = Path(checkpoints.folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{checkpoints.name}.layer{next_layer:05d}.rank{group_.rank}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"next_layer": str(next_layer), "signature": checkpoints.signature, "world": str(group_.world)}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"),
              metadata=meta)
    if streams is not None:
        streams.save(tmp)
    os.replace(tmp, final)
    group_.barrier()
    for layer, path in _layers(checkpoints, group_.rank).items():
        if layer != next_layer:
            shutil.rmtree(path)
    group_.barrier()  # no rank goes on (rank 0 removes the whole folder when done) while another still deletes


def load(checkpoints: Checkpoints, group_: Group) -> Saved | None:
    """The newest checkpoint of the pass that every rank saved (None: none, start afresh); refused when it was made
    with other arguments or another number of ranks."""
    if checkpoints.folder is None:
        return None
    layers = _layers(checkpoints, group_.rank)
    if layers and not checkpoints.resume:
        raise ValueError(f"{checkpoints.folder} holds an interrupted run: pass --resume to continue it, or delete it")
    agreed = group_.smallest(max(layers, default=-1))
    if agreed < 0:
        return None
    path = layers[agreed]
    meta = _meta(path / "state.safetensors")
    if meta["signature"] != checkpoints.signature or meta["world"] != str(group_.world):
        saved = json.loads(meta["signature"])
        now = json.loads(checkpoints.signature)
        differs = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if meta["world"] != str(group_.world):
            differs.append(f"{meta['world']} ranks, now {group_.world}")
        raise ValueError(f"checkpoint {path} was made with other arguments ({', '.join(differs)}); "
                         f"rerun with the same arguments or delete it")
    return Saved(agreed, load_file(str(path / "state.safetensors")), path)


def _meta(path: Path) -> dict:
    """A checkpoint's metadata; ValueError when it is not one compact wrote."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        json.loads(meta["signature"])
        if not meta["next_layer"].isdigit() or not meta["world"].isdigit():
            raise ValueError(meta)
    except (SafetensorError, OSError, KeyError, ValueError):
        raise ValueError(f"checkpoint {path} is damaged or not one compact wrote: delete it to start afresh") from None
    return meta


def digest(value) -> str:
    """A short stable name for a JSON-able value (a pass's inputs: its checkpoints' file names)."""
    return hashlib.sha1(json.dumps(value).encode()).hexdigest()[:12]


def holds_checkpoints(folder: str | Path) -> bool:
    """Whether `folder` holds a checkpoint some rank saved (not only a temporary one, or spilled streams)."""
    folder = Path(folder)
    return folder.is_dir() and any(_NAME.match(path.name) for path in folder.iterdir())


def discard(folder: str | None) -> None:
    """A finished job's checkpoints removed."""
    if folder is not None and Path(folder).is_dir():
        shutil.rmtree(folder)
