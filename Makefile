# Quick start: `make pretrain` (set up .venv, train the debug hybrid model on 2 CPU ranks) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
NUM_RANKS ?= 2
CONFIG ?= configs/debug_hybrid.yaml
# DeepSpeed JIT-builds a CPU comm op once (~30 s); keep it with the venv so later runs reuse it.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup pretrain test test-fast lint dry-run clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: any later `torch` requirement is then already satisfied (no CUDA download).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

pretrain: setup
	$(BIN)/deepspeed --num_gpus $(NUM_RANKS) launcher/pretrain.py --config $(CONFIG) --overwrite $(ARGS)

dry-run: setup
	$(BIN)/python launcher/pretrain.py --config $(CONFIG) --dry-run --world-size $(NUM_RANKS)

test: setup
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
