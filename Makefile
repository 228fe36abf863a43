# README command 1: `make run`   README command 2: `make test`
VENV ?= .venv
PYTHON ?= python3
HOST_PYTHON := $(shell command -v $(PYTHON))
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
UI_PORT ?= 5000

.PHONY: help install run test test-fast deps lint format ui repro clean bench-overhead bench-throughput bench-cores bench-noop bench-validation bench-accuracy bench-serving bench-prediction-log bench-monitor bench-sweep bench-make-run mlflow-server

help:  ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# --compile-bytecode: byte-compile every installed module now. uv does not by default, and with
# PYTHONDONTWRITEBYTECODE set (as on the machines this was measured on) each process would
# recompile its imports: importing TensorFlow took 11 s instead of 4.
$(VENV)/.installed: pyproject.toml
	$(HOST_PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install -q --compile-bytecode -p $(BIN)/python -e '.[dev]'
	touch $@

install: $(VENV)/.installed  ## Create .venv and install the package with its dev tools

run: install  ## The main job: ingest, validate, train, evaluate and promote on the full dataset
	digitflow run

test: install  ## Run the whole test suite (small slices, real components, real servers)
	pytest

test-fast: install  ## The fast tier, for every few minutes: no training, no servers, no browser
	pytest -m "not slow"

deps: install  ## Recompute dvc.yaml's src/ dependencies of each stage from its imports
	python -m digitflow.depgraph --write

lint: install  ## Ruff lint and format check
	ruff check src flows tests bench
	ruff format --check src flows tests bench

format: install  ## Apply ruff's fixes and formatting
	ruff check --fix src flows tests bench
	ruff format src flows tests bench

repro: install  ## Rebuild what changed with DVC
	dvc repro

ui: install  ## Open the MLflow UI on the embedded store (http://127.0.0.1:$(UI_PORT))
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

bench-prediction-log: install  ## Single-image latency with the prediction log on vs off
	python bench/prediction_log.py

bench-monitor: install  ## Drift monitoring: time on 10,000 logged predictions, false alarms over 40 windows
	python bench/monitor.py

bench-sweep: install  ## A 4-trial sweep with 1 Dask worker vs 2
	python bench/sweep.py

mlflow-server: install  ## MLflow tracking server on PostgreSQL (DIGITFLOW_TRACKING_BACKEND_URI) with served artifacts
	digitflow tracking-server

bench-overhead: install  ## Plain tutorial script vs the whole pipeline: flow, flow on a running Prefect server, dvc repro
	python bench/overhead.py

bench-throughput: install  ## Samples/s: the train stage's tf.data input path vs numpy arrays
	python bench/throughput.py

bench-cores: install  ## Training's CPU utilisation under thread settings, and the machine's pace
	python bench/cores.py

bench-noop: install  ## Cost of `dvc repro` and a flow run when nothing changed
	python bench/noop.py

bench-validation: install  ## `digitflow validate` on all 70,000 images
	python bench/validation_cost.py

bench-make-run: install  ## README command 1 as a new user runs it: `make run` in a fresh clone, timed
	python bench/make_run.py

bench-accuracy: install  ## Test accuracy and training time over three seeds, both models
	python bench/accuracy.py --preset digit_cnn --seeds 1 2 3
	python bench/accuracy.py --preset seed_cnn --seeds 1 2 3

bench-serving: install  ## HTTP latency (p50/p99) and batch throughput of the served model vs model.predict
	python bench/serving.py

clean:  ## Remove pipeline outputs (keeps data/, the MLflow store and .venv)
	rm -rf artifacts reports
