# Fresh-machine entry points. Each target creates .venv if needed, with the pinned CPU torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup demo test lint bench clean

$(BIN)/conveyor: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/conveyor

setup: $(BIN)/conveyor

demo: setup
	$(BIN)/conveyor train --pp 2

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
