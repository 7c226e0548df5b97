"""Import, once, what the suite's processes import, so that its bytecode is in `.venv/pycache` before `make test`
starts two workers and their subprocesses: each would otherwise compile torch, transformers and lm-eval from
source at the same moment (~10 s of CPU a process on a fresh clone). `make test` runs this after installing."""
import accelerate  # noqa: F401
import datasets  # noqa: F401
import gguf  # noqa: F401
import hypothesis  # noqa: F401
import lm_eval.evaluator  # noqa: F401
import lm_eval.models.huggingface  # noqa: F401
import matplotlib.pyplot  # noqa: F401
import pytest  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
import triton  # noqa: F401
import xdist  # noqa: F401
from transformers import (Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM, LlamaForCausalLM,  # noqa: F401
                          MistralForCausalLM, Phi3ForCausalLM, PreTrainedTokenizerFast, Qwen2ForCausalLM,
                          Qwen3ForCausalLM)

import compact.api  # noqa: F401
import compact.cli  # noqa: F401
import compact.engine  # noqa: F401
import compact.export  # noqa: F401
import compact.loading  # noqa: F401
import compact.pruning  # noqa: F401
import compact.zeroshot  # noqa: F401
