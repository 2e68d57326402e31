# One virtual environment, .venv, holds everything. torch is installed first from its pinned
# CPU build: a plain `pip install torch` would pull several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
MNIST_DIR ?= ../shared/data/mnist
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test install install-dev lint model model-2d bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/vae-serve --host $(HOST) --port $(PORT)

test: install-dev
	$(BIN)/ruff check service trainer tests
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check service trainer tests
	$(BIN)/ruff format --check service trainer tests

# The shipped models. Each command reproduces its artifact (bit-for-bit weights on CPU for
# the same torch build); the new version lands beside the shipped one in model_store/.
model: install-dev
	$(BIN)/vae-train --name mnist --dataset mnist --data-dir $(MNIST_DIR) --epochs 130 \
		--latent-dim 32 --channels 32 --hidden 512 --blocks 0 --batch-size 128 --lr 1e-3 \
		--seed 0 --device cpu --threads 2 --workdir runs/mnist

model-2d: install-dev
	$(BIN)/vae-train --name mnist-2d --dataset mnist --data-dir $(MNIST_DIR) --epochs 40 \
		--latent-dim 2 --channels 32 --hidden 512 --blocks 0 --batch-size 128 --lr 1e-3 \
		--seed 0 --device cpu --threads 2 --workdir runs/mnist-2d

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
