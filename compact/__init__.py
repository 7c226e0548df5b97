"""compact: COMPACT pruning of LLM vocabularies and FFN channels, driven by the Triton kernels in compact_kernels."""
__version__ = "0.1.0"

__all__ = ["ChannelScorer", "score_channels", "__version__"]


def __getattr__(name):
    """Lazy: `compact --version` and `--help` stay fast (no torch import)."""
    if name in ("ChannelScorer", "score_channels"):
        from . import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module 'compact' has no attribute {name!r}")
