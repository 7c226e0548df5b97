"""compact: COMPACT pruning of LLM vocabularies and FFN channels, driven by the Triton kernels in compact_kernels."""
__version__ = "0.1.0"
