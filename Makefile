# The two entry points of the README. Both create the virtual environment on first use.
#   make repro       run the whole pipeline (dvc repro) on the built-in synthetic data
#   make test        run the whole test suite
# And for everyday work:
#   make test-fast   the tests that start no DVC, torchrun, server or browser (under 90 s on two cores)
#   make lint        ruff (lint and format) and mypy, as CI runs them
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: repro test test-fast lint env

env: $(STAMP)

# pip, not uv: the pinned torch/torchvision pair installs from local wheel files that pip finds.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc repro

# pytest exits 5 when it collected no test: that is a failure, not a pass.
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest; status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$status

test-fast: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -m "not slow and not gpu"; status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: no tests were collected" >&2; exit 1; fi; exit $$status

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/ruff format --check pipeline tests benchmarks
	$(BIN)/mypy
