# Set-up on a fresh machine: torch first (the CPU wheel on local disk), then the project.
# See ../shared/design/environment.md.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test bench venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python -m examples.lenet300_demo

test: venv
	$(BIN)/python -m pytest tests -x -q -m "not slow"

bench: venv
	$(BIN)/python benchmarks/pass_speed.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info
