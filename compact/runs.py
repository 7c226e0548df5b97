"""Long scoring runs: data parallel over processes (torch.distributed) and checkpoint / resume.

Under `torchrun --nproc-per-node N -m compact score ...` every rank scores a contiguous block of the
calibration sequences; the float64 sums are added with all_reduce (NCCL on GPUs, gloo on CPUs) and rank 0
writes the output. With `checkpoint_every`, the partial sums and the next batch are saved every B batches
(written to a temporary file, then renamed); `resume` continues from there after a crash and refuses a
checkpoint made with other arguments; a finished run removes its checkpoint.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .scoring import ChannelScorer, Checkpointing, run_scorer
from .sums import Sums


@dataclass(frozen=True)
class Checkpoints:
    """Where a pass's resume checkpoints go and when (built from compact.options.Run and the signature)."""

    checkpoint: str | None = None  # file for the partial sums (a rank suffix is added under torchrun)
    every: int = 0                 # save every this many batches; 0: never
    resume: bool = False
    signature: dict = field(default_factory=dict)  # the arguments the run was started with


def distributed() -> tuple[int, int]:
    """(rank, world size); joins torchrun's process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def leave() -> None:
    """Leave torchrun's process group, when this process joined one: a gloo group left to the interpreter's exit
    can abort it ("terminate called without an active exception": 3 runs in 14 of the 2-rank test here)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(count: int, rank: int, world: int) -> slice:
    """The contiguous block of `count` sequences that `rank` of `world` scores."""
    return slice(count * rank // world, count * (rank + 1) // world)


def save_checkpoint(path: Path, sums: Sums, next_batch: int, signature: dict) -> None:
    """Partial sums + position, atomically (a crash mid-write leaves the previous checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sums.state_dict().items()}
    save_file(tensors, str(tmp), metadata={"next_batch": str(next_batch), "signature": json.dumps(signature)})
    os.replace(tmp, path)


def _path(checkpoint: str | None, rank: int, world: int) -> Path | None:
    """This rank's checkpoint file (a rank suffix under torchrun), or None."""
    return None if checkpoint is None else Path(checkpoint + (f".rank{rank}" if world > 1 else ""))


def resume_point(checkpoint: str | None, resume: bool) -> int:
    """The batch a --resume run of `checkpoint` will continue from (0 when it starts afresh)."""
    path = _path(checkpoint, *distributed())
    if path is None or not path.exists() or not resume:
        return 0
    return int(_checkpoint_meta(path)["next_batch"])


def _checkpoint_meta(path: Path) -> dict:
    """A checkpoint's metadata (next_batch as digits, signature as JSON); ValueError when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        json.loads(meta["signature"])
        if not meta["next_batch"].isdigit():
            raise ValueError(meta["next_batch"])
    except (SafetensorError, OSError, KeyError, ValueError):
        raise ValueError(f"checkpoint {path} is damaged or not one compact wrote: delete it to start afresh") from None
    return meta


def load_checkpoint(path: Path, sums: Sums, signature: dict) -> int:
    """Restore the partial sums into `sums`; the batch to continue from."""
    meta = _checkpoint_meta(path)
    saved = json.loads(meta["signature"])
    if saved != signature:
        differs = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
        raise ValueError(f"checkpoint {path} was made with other arguments ({', '.join(differs)}); "
                         f"rerun with the same arguments or delete it")
    sums.load_state_dict(load_file(str(path)))
    return int(meta["next_batch"])


def run(scorer: ChannelScorer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
        batch_size: int = 1, progress: bool | None = None, opts: Checkpoints | None = None) -> int:
    """run_scorer over this rank's shard, with checkpoints, then the sums of all ranks into `scorer`.
    Returns the batch this process started from (> 0 when it resumed)."""
    opts = opts or Checkpoints()
    rank, world = distributed()
    part = shard(input_ids.shape[0], rank, world)
    ids, mask = input_ids[part], None if attention_mask is None else attention_mask[part]
    path = _path(opts.checkpoint, rank, world)
    signature = {**opts.signature, "rank": rank, "world": world, "batch_size": batch_size}
    start = 0
    if path is not None and path.exists():
        if not opts.resume:
            raise ValueError(f"{path} holds an interrupted run: pass --resume to continue it, or delete it")
        start = load_checkpoint(path, scorer.sums, signature)
    batches = -(-ids.shape[0] // batch_size)

    def on_batch(done: int) -> None:
        if path is not None and opts.every and done % opts.every == 0 and done < batches:
            save_checkpoint(path, scorer.sums, done, signature)

    run_scorer(scorer, ids, mask, batch_size=batch_size, progress=progress,
               checkpointing=Checkpointing(start, on_batch))
    if world > 1:
        scorer.sums.all_reduce()
    if path is not None and path.exists():
        path.unlink()
    return start
