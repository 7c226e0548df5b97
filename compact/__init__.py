"""compact: COMPACT pruning of LLM vocabularies and FFN channels, driven by the Triton kernels in compact_kernels.

From Python (the CLI runs the same code): `score_channels` / `ChannelScorer` score FFN channels; `load` reads a
model folder or a .gguf file as the CLI does; `decide` computes what a prune keeps (a frozen `Decision`), `apply`
cuts a model in memory as a decision says, and `prune` does both.
"""
__version__ = "0.1.0"

__all__ = ["ChannelScorer", "score_channels", "load", "decide", "apply", "prune", "Decision", "Method", "Run",
           "CalibOptions", "__version__"]

_LAZY = {"ChannelScorer": "scoring", "score_channels": "scoring", "load": "api", "decide": "api", "apply": "api",
         "prune": "api", "Decision": "pruning", "Method": "options", "Run": "options", "CalibOptions": "options"}


def __getattr__(name):
    """Lazy: `compact --version` and `--help` stay fast (no torch import)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'compact' has no attribute {name!r}")
