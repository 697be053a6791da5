# Two commands on a fresh machine:
#   make demo   build the shapes-world demo: train a tiny Chameleon-style model on CPU, sample, evaluate
#   make test   run the test suite (what CI runs)
# Optional: make notebook   open notebooks/generate.ipynb in JupyterLab (after make demo: it loads runs/demo)
# Both create .venv and install with constraints.txt (pinned torch/torchvision).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --constraint constraints.txt
DEMO_DIR ?= runs/demo

.PHONY: demo test venv clean-venv lint notebook

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev,hf,data]'
	touch $@ $(VENV)/.base-installed

$(VENV)/.notebook-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[notebook]'
	touch $@ $(VENV)/.base-installed

venv: $(VENV)/.base-installed

demo: $(VENV)/.base-installed
	$(BIN)/python -m chameleon_lite.cli.demo out_dir=$(DEMO_DIR)

# One OpenMP thread per process: the suite runs many tiny models and 2-process DDP tests, where
# threads only add synchronisation; each test process stays on one core.
test: $(VENV)/.dev-installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=15

notebook: $(VENV)/.notebook-installed
	$(BIN)/jupyter lab notebooks/generate.ipynb

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check chameleon_lite tests benchmarks

clean-venv:
	rm -rf $(VENV)
