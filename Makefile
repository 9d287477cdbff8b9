# Two commands do everything on a fresh machine:
#   make demo   - set up, then train a tiny model with coral-torch checkpoints and show what was stored
#   make test   - set up, lint (ruff, mypy), then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned for set-up only (the CPU build that lies on this machine's disk, no CUDA download);
# pyproject.toml declares the normal range users get.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint bench setup clean

$(VENV)/.ready: pyproject.toml setup.py coral_torch/_planes.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	@# setuptools warns about every editable install (BuildBackendWarning); that is not ours to fix
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e ".[test,bench]"
	touch $@

setup: $(VENV)/.ready

demo: setup
	$(PY) examples/demo.py

# lint and type checks over the package: zero findings (config in pyproject.toml)
lint: setup
	$(VENV)/bin/ruff check coral_torch
	$(VENV)/bin/ruff format --check coral_torch
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) bench/store_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
