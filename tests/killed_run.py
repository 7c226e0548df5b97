"""`python tests/killed_run.py LAYER ARGS...`: `compact ARGS...` that SIGKILLs itself (every rank, under torchrun)
right after its prune pass saved the checkpoint before layer LAYER: a kill at a known point, for the resume
tests (a real SIGKILL: no cleanup of any kind runs)."""
import os
import signal
import sys

from compact import cli, runs

LAYER = int(sys.argv[1])
_save = runs.save


def save(checkpoints, group, next_layer, tensors, streams=None):
    _save(checkpoints, group, next_layer, tensors, streams)
    if checkpoints.name.startswith("ffn-") and next_layer == LAYER:
        os.kill(os.getpid(), signal.SIGKILL)


runs.save = save
sys.exit(cli.main(sys.argv[2:]))
