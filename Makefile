# The README's commands. `make repro` and `make test` create .venv and install
# everything from pyproject.toml first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs `graftline`, so the venv's bin goes first on PATH.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup repro test clean

setup: $(STAMP)

# Two steps (see pyproject.toml, [project.optional-dependencies] tfx-sdk): TFX's
# component SDK pins versions that have no Linux wheel, so it goes in --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $$($(BIN)/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["tfx-sdk"]))')
	$(BIN)/python -c "import tensorflow, apache_beam, dvc, pyarrow, ml_metadata; from tfx.dsl.component.experimental.decorators import component; from tfx.orchestration.local.local_dag_runner import LocalDagRunner"
	touch $@

repro: setup
	$(RUN) dvc repro

test: setup
	$(RUN) python -m pytest -ra

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
