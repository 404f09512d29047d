# `make repro` and `make test` set everything up on a fresh machine: a virtual environment with the pinned
# dependencies, then the pipeline or the tests. Without internet, point VAELAB_MNIST_MIRROR at a folder or
# URL with the four MNIST files; a ../shared/mnist folder beside the clone is used when present.
VENV := .venv
BIN := $(VENV)/bin
export VAELAB_MNIST_MIRROR ?= $(abspath $(wildcard ../shared/mnist))
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench bench-slurm gpu-check gpu-literature ui clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

repro: setup
	dvc repro

test: setup
	pytest -v

ui: setup  ## MLflow's UI on mlflow.db; first prints the link to the experiment's runs in the "Model training" view
	@vaelab ui-link
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean-venv:
	rm -rf $(VENV)

bench: setup  ## the training epoch against a plain PyTorch loop; writes reports/bench.json
	python -m vaelab.bench

bench-slurm: setup  ## `vaelab slurm`'s overhead on a real one-machine Slurm (root, slurm-wlm, munge): a 200-epoch point
	python tests/slurm_bench.py

gpu-check:  ## on a GPU machine, PyTorch alone needed: the CUDA tests, the seed's 1000 epochs and the evaluation timed; reports/gpu.json
	PYTHONPATH=src python3 -m vaelab.gpu_check

# the rows reports/literature.json does not have yet (a test keeps them so)
LITERATURE_ROWS ?= burda-iwae-k5 burda-iwae-k50
gpu-literature:  ## on a GPU machine, PyTorch alone needed: the literature rows (LITERATURE_ROWS=...), appended to reports/literature.json
	PYTHONPATH=src python3 -m vaelab.literature run --device cuda $(LITERATURE_ROWS)
