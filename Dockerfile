# cosod-ml-backend: one image for the API (gunicorn) and the workers (cosod-worker).
#
#   docker build -t cosod-ml-backend .                                         # no weights baked in
#   docker build --build-arg COSOD_FETCH_WEIGHTS=vit_small_patch8_224.dino -t cosod-ml-backend .
#   docker build --build-arg BASE_IMAGE=my-python:3.11 -t cosod-ml-backend .  # another Python 3.11 base
#
# COSOD_FETCH_WEIGHTS is a space-separated list of backbone names (see `cosod weights list`); each is fetched
# at build time with `cosod weights fetch NAME` into /opt/cosod/weights, so no container downloads weights
# at run time.
#
# Every Python package comes from the lock (requirements/deploy.txt: exact versions, hash-checked). Its torch
# is PyPI's Linux wheel, torch 2.14.1 built for CUDA 13.0, which bundles the CUDA runtime as nvidia-* wheels:
# a GPU host needs only the NVIDIA driver (580 or newer, what CUDA 13.0 requires) and the NVIDIA container
# toolkit. The same image runs on a CPU (COSOD_DEVICE=cpu; `docker compose --profile cpu up`).
#
# BASE_IMAGE must provide python3 (3.11) with venv and pip, and apt (Debian). The default is pinned to a
# patch release on Debian bookworm, so a rebuild gets the same OS and Python. Two stages: the compilers
# that build pydensecrf2 stay in the first; the final image gets the finished virtual environment only.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && if ! python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then \
         apt-get install -y --no-install-recommends python3-dev; fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /opt/cosod/app
# The dependencies first, so that a code change does not reinstall torch; then the package itself, with
# nothing resolved on the day.
COPY requirements/deploy.txt ./requirements/deploy.txt
RUN pip install --require-hashes --no-deps -r requirements/deploy.txt
COPY pyproject.toml README.md ./
COPY cosod ./cosod
COPY backend ./backend
COPY label_config ./label_config
RUN pip install --no-deps --no-build-isolation . && pip check

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    COSOD_WEIGHTS_DIR=/opt/cosod/weights \
    COSOD_CACHE_DIR=/data/features \
    MODEL_DIR=/data/models \
    PORT=9090 \
    WORKERS=1 \
    THREADS=4
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/cosod/app
COPY label_config ./label_config

ARG COSOD_FETCH_WEIGHTS=""
# The folders the compose file mounts volumes on exist, owned by the service user, before any volume is
# created: a new named volume takes the owner of the folder it is mounted on (root otherwise, and the
# backend could not open MODEL_DIR/cosod.sqlite3).
RUN useradd --create-home --uid 1000 cosod \
    && mkdir -p /data/models /data/features "$COSOD_WEIGHTS_DIR" \
    && for name in $COSOD_FETCH_WEIGHTS; do cosod weights fetch "$name" --weights-dir "$COSOD_WEIGHTS_DIR"; done \
    && chown -R cosod /data "$COSOD_WEIGHTS_DIR"
USER cosod
EXPOSE 9090

# The API. Workers run the same image with `command: cosod-worker`. No --preload: each gunicorn worker
# loads the pipeline itself after the fork. backend/api/gunicorn_conf.py puts the API's processes (only them:
# no ENV here, the RQ workers must not get it) in Prometheus multiprocess mode, so /metrics sums all workers.
CMD ["sh", "-c", "exec gunicorn -c python:backend.api.gunicorn_conf --bind 0.0.0.0:${PORT} --workers ${WORKERS} --threads ${THREADS} --timeout 0 'backend.api.app:create_app()'"]
