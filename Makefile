# Two commands matter: `make run` (the embedded default) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned here, not in the lock's resolution: the CPU build lies on this machine, and a
# looser spec pulls a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
# Every other package is installed at exactly the version in requirements.lock (made by `make lock`).
LOCK := requirements.lock

.PHONY: run test install lint lock clean

$(STAMP): pyproject.toml $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/fastgrpo-train $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check fastgrpo megatron_ext tests

# Refresh the lock on purpose only: resolve pyproject's ranges (dev extra, Python 3.10-3.12, any
# platform) anew with uv, torch held at TORCH_VERSION. Commit the result with the test run it passed.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q uv
	echo "torch==$(TORCH_VERSION)" > $(VENV)/torch-constraint.txt
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 \
		--constraint $(VENV)/torch-constraint.txt --no-header --quiet -o $(LOCK).tmp
	{ echo "# Exact versions CI passed with. Made by \`make lock\` (uv pip compile pyproject.toml --extra dev"; \
	  echo "# --universal, torch held at $(TORCH_VERSION)); used as pip constraints by \`make install\`."; \
	  cat $(LOCK).tmp; } > $(LOCK)
	rm -f $(LOCK).tmp

clean:
	rm -rf outputs mlflow.db mlruns .pytest_cache
