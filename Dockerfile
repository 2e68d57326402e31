# syntax=docker/dockerfile:1
#
# The VAE model service (docs/deployment.md).
#
#   docker build -t vae-service .                                   the API (the last stage, `api`)
#   docker build --target trainer -t vae-service-trainer .          the trainer, a one-shot job
#   docker build --build-arg TORCH_VARIANT=cu128 -t vae-service:cuda .   CUDA PyTorch instead of CPU
#
# Stages: `builder` makes the virtual environment (torch, then the runtime dependencies, then
# the project); `trainer-builder` adds the `train` extra to a copy of it; `runtime` is what
# both final images share (tini, the unprivileged user); `trainer` and `api` copy in their
# environment and the shipped models. Nothing from the builders but /opt/venv reaches them.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------------------------ builder
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
# `cpu`, or a CUDA build of PyTorch such as `cu128`: the name of its package index.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# (No PYTHONDONTWRITEBYTECODE here: pip's compiled .pyc files are what make the server start
# fast on a read-only root file system, where nothing can be compiled and cached later.)
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first and from PyTorch's own index: PyPI's torch pulls several GB of CUDA packages
# even for a CPU image. Its own layer, so that a change to our code does not fetch it again.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
# The client package (client/), which the service depends on for its image-array helpers.
COPY client/ client/
RUN pip install --no-cache-dir ./client
# The runtime dependencies, read from pyproject.toml alone (this layer is rebuilt only when it
# changes); torch==2.13.0 and vae-service-client are already satisfied by the installs above.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep=chr(10))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
# The project itself, without dependencies (all installed above) and without extras: the
# serving image carries no plotting, progress-bar or test libraries.
COPY README.md ./
COPY service/ service/
COPY trainer/ trainer/
RUN pip install --no-cache-dir --no-deps .

# ---------------------------------------------------------------------------- trainer-builder
FROM builder AS trainer-builder
# The `train` extra (matplotlib, tqdm), read from pyproject.toml like the dependencies above.
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['train'], sep=chr(10))" > requirements-train.txt \
    && pip install --no-cache-dir -r requirements-train.txt

# ------------------------------------------------------------------------------------ runtime
FROM ${PYTHON_IMAGE} AS runtime
# tini is PID 1: it forwards SIGTERM (docker stop) and SIGHUP (reload) to the server, its
# child, and reaps zombies. A Python server as PID 1 would reap nothing, and the kernel
# would drop every signal it has no handler for.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
# A fixed unprivileged UID/GID, so that files the trainer writes into a shared volume, and
# host directories mounted over /app/model_store, have a known owner: 10001. The store's
# directory is theirs too: a new volume takes its owner from it, and the trainer creates
# <name>/ directories in it.
RUN groupadd --system --gid 10001 vae \
    && useradd --system --uid 10001 --gid vae --home-dir /app --no-create-home --shell /usr/sbin/nologin vae \
    && mkdir -p /app/model_store \
    && chown 10001:10001 /app/model_store
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VAE_MODEL_STORE=/app/model_store
WORKDIR /app

# ------------------------------------------------------------------------------------ trainer
# docker compose --profile train run --rm trainer --name mnist --epochs 130 ...
FROM runtime AS trainer
COPY --from=trainer-builder /opt/venv /opt/venv
# Checkpoints (--workdir, default runs/<name>) and the dataset are volumes in compose.
RUN mkdir -p /app/runs /data/mnist && chown 10001:10001 /app/runs /data/mnist
# The shipped models: a new, empty volume mounted here starts as a copy of them.
COPY --chown=10001:10001 model_store/ /app/model_store/
ENV VAE_DATA_DIR=/data/mnist \
    MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
ENTRYPOINT ["tini", "--", "vae-train"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------- api
FROM runtime AS api
COPY --from=builder /opt/venv /opt/venv
# The shipped models are the default store; mount a volume over /app/model_store to serve others.
COPY --chown=10001:10001 model_store/ /app/model_store/
# vae-serve reads every setting from VAE_* (docs/service.md). It drains for up to
# VAE_GRACEFUL_TIMEOUT seconds after SIGTERM: give `docker stop -t` / stop_grace_period more.
ENV VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_GRACEFUL_TIMEOUT=30
USER 10001:10001
EXPOSE 8000
# Liveness, with the standard library only (no curl in the image): GET /healthz.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]
# -e 143: after a graceful shutdown uvicorn ends by re-raising SIGTERM, which tini reports as
# 128 + 15; that is a clean stop, so the container exits 0. SIGKILL (137) stays a failure.
ENTRYPOINT ["tini", "-e", "143", "--"]
CMD ["vae-serve"]
