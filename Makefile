# One virtual environment, .venv, holds everything. torch is installed first from its pinned
# CPU build: a plain `pip install torch` would pull several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
MNIST_DIR ?= ../shared/data/mnist
HOST ?= 127.0.0.1
PORT ?= 8000
FUZZ_EXAMPLES ?= 200

.PHONY: serve test image-test install install-dev install-bench bench-decoder lint model model-2d model-prior model-2d-prior model-reexport bench classes slow-clients screenshot clean fuzz reliability

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The client (client/, its own distribution) in the same pip command as the service, which
# depends on it.
$(VENV)/.installed: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ./client -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ./client -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ./client -e '.[bench]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-bench: $(VENV)/.installed-bench

serve: install
	$(BIN)/vae-serve --host $(HOST) --port $(PORT)

test: install-dev
	$(BIN)/ruff check service trainer client tests bench
	cd client && ../$(BIN)/mypy --strict vae_client
	$(BIN)/python -m pytest

# The container images and the compose deployment, built and run for real with Podman
# (tests/deploy/test_containers.py; `make test` runs them too, or skips them with one line where
# no engine can run). Minutes: a first run makes a Debian base image and builds every image.
image-test: install-dev
	$(BIN)/python -m pytest -m containers -v

# docs/explorer.png, the README's picture of the explorer page: the shipped models, served by a
# real vae-serve, in headless Chromium.
screenshot: install-dev
	$(BIN)/python tests/screenshot.py docs/explorer.png

# The long fuzzing runs: tests/service/test_fuzz.py (schemathesis over every operation, same
# checks as in CI) with FUZZ_EXAMPLES examples per operation and kind instead of 15 (~10 000
# requests), and test_openapi.py's `schemathesis run --checks all` with 300 examples per
# operation instead of 100. About 10 minutes; the README keeps their rows beside CI's.
fuzz: install-dev
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) OPENAPI_EXAMPLES=300 $(BIN)/python -m pytest -q \
		tests/service/test_fuzz.py tests/service/test_openapi.py::test_schemathesis_with_every_check_finds_nothing

lint: install-dev
	$(BIN)/ruff check service trainer client tests bench
	$(BIN)/ruff format --check service trainer client tests bench
	cd client && ../$(BIN)/mypy --strict vae_client

# The README's Reliability table: the whole suite (each hardening test records what it tried
# and saw in tests/output/reliability.md), then the table copied into README.md. Rows of the
# last `make fuzz` run are kept beside the CI-sized fuzzing rows.
reliability: install-dev
	$(BIN)/python -m pytest -q
	$(BIN)/python -m tests.reliability

# The serving benchmark (docs/performance.md): the service against a plain FastAPI app, the
# same artifact under LitServe and its own ceiling, driven by wrk on loopback; CPU per request
# is its headline figure. Several minutes; run it on a quiet machine. BENCH_ARGS=--quick for
# short runs; BENCH_ARGS="--baseline 01f09fa --before-set VAE_MODELS=mnist:v3 --rounds 2"
# against the code before issue 26 serving the model it served, in turns.
bench: install-bench
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -qq wrk >/dev/null; } \
		|| { echo "make bench needs the load generator wrk: sudo apt-get install -y wrk (Debian/Ubuntu) or brew install wrk (macOS)"; exit 1; }
	$(BIN)/python -m bench $(BENCH_ARGS)

# The decoder pass alone (bench/decoder.py): v2's and v3's against v4's serving form, TorchScript
# and torch.export, fp32 and bf16, whole and layer by layer, one torch thread. About a minute.
bench-decoder: install-dev
	$(BIN)/python -m bench.decoder $(DECODER_ARGS)

# Draws of each class through the service, judged by the shipped classifier and by a second one
# (another seed, trained on first use into runs/): min_confidence's redraw rate per class and
# what the filtering is worth to a judge that did not do it (bench/classes.py). Minutes.
classes: install-dev
	$(BIN)/python -m bench.classes --data-dir $(MNIST_DIR) $(CLASSES_ARGS)

# The slow-body attack (docs/deployment.md#slow-and-greedy-clients) against a server already
# running on this machine: 200 slow connections from 127.0.0.2 for 40 s beside 4 ordinary
# clients, then what each saw. SLOW_ARGS="--url http://127.0.0.1:8000 --sources 127.0.1.1-100".
slow-clients: install
	$(BIN)/python -m bench.slow_clients $(SLOW_ARGS)

# The shipped models. Each command reproduces its artifact (bit-for-bit weights on CPU for
# the same torch build); the new version lands beside the shipped ones in model_store/.
# `model` and `model-2d` train the VAE and then its learned prior, in one version;
# `model-prior` and `model-2d-prior` add the class-conditional learned prior (and the shipped
# classifier) to the shipped v1, as v3 was made: `make model-prior model-2d-prior`, minutes.
# PRIOR_ARGS are vae-train's defaults, spelt out.
# (v2, format 2, was made by the same targets before format 3, with --prior-codes draws
# --prior-components 50 --prior-iterations 60 and one mixture for all digits.)
PRIOR_ARGS := --prior-kind mixture --prior-codes confident-draws --prior-codes-confidence 0.99 \
	--prior-draws 4 --prior-components 20 --prior-iterations 40
model: install-dev
	$(BIN)/vae-train --name mnist --dataset mnist --data-dir $(MNIST_DIR) --epochs 130 \
		--latent-dim 32 --channels 32 --hidden 512 --blocks 0 --batch-size 128 --lr 1e-3 \
		--seed 0 --device cpu --threads 2 --workdir runs/mnist $(PRIOR_ARGS)

model-2d: install-dev
	$(BIN)/vae-train --name mnist-2d --dataset mnist --data-dir $(MNIST_DIR) --epochs 40 \
		--latent-dim 2 --channels 32 --hidden 512 --blocks 0 --batch-size 128 --lr 1e-3 \
		--seed 0 --device cpu --threads 2 --iwae-k 500 --workdir runs/mnist-2d $(PRIOR_ARGS)

model-prior: install-dev
	$(BIN)/vae-train --name mnist --from-artifact model_store/mnist/v1 --data-dir $(MNIST_DIR) \
		--seed 0 --threads 2 --workdir runs/mnist-prior $(PRIOR_ARGS)

model-2d-prior: install-dev
	$(BIN)/vae-train --name mnist-2d --from-artifact model_store/mnist-2d/v1 --data-dir $(MNIST_DIR) \
		--seed 0 --threads 2 --workdir runs/mnist-2d-prior $(PRIOR_ARGS)

# v4 of both shipped models: v3 re-exported from the same weights, the decoder in the serving
# form (checked against v3 on MNIST's test digits) and the torch.export programs beside it.
model-reexport: install-dev
	$(BIN)/vae-export model_store/mnist/v3 --data-dir $(MNIST_DIR)
	$(BIN)/vae-export model_store/mnist-2d/v3 --data-dir $(MNIST_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
