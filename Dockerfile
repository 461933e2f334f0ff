# cosod-ml-backend: one image for the API (gunicorn) and the GPU workers (cosod-worker).
#
#   docker build -t cosod-ml-backend .                                         # no weights baked in
#   docker build --build-arg COSOD_FETCH_WEIGHTS=vit_small_patch8_224.dino -t cosod-ml-backend .
#
# COSOD_FETCH_WEIGHTS is a space-separated list of backbone names (see `cosod weights list`); each is fetched
# at build time with `cosod weights fetch NAME` into /opt/cosod/weights, so no container downloads weights
# at run time. torch is the lock's (requirements/deploy.txt): PyPI's Linux wheel, which bundles the CUDA runtime
# as nvidia-* wheels; the host needs only the NVIDIA driver and the container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    COSOD_WEIGHTS_DIR=/opt/cosod/weights \
    COSOD_CACHE_DIR=/data/features \
    MODEL_DIR=/data/models \
    PORT=9090 \
    WORKERS=1 \
    THREADS=4

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cosod/app
# The dependencies first, from the lock (exact versions, hash-checked; `make lock` writes it), so that a code
# change does not reinstall torch. Then the package itself, with nothing resolved on the day.
COPY requirements/deploy.txt ./requirements/deploy.txt
RUN pip install --require-hashes --no-deps -r requirements/deploy.txt
COPY pyproject.toml README.md ./
COPY cosod ./cosod
COPY backend ./backend
COPY label_config ./label_config
RUN pip install --no-deps --no-build-isolation . && pip check

ARG COSOD_FETCH_WEIGHTS=""
RUN mkdir -p "$COSOD_WEIGHTS_DIR" \
    && for name in $COSOD_FETCH_WEIGHTS; do cosod weights fetch "$name" --weights-dir "$COSOD_WEIGHTS_DIR"; done

RUN useradd --create-home --uid 1000 cosod && mkdir -p /data && chown -R cosod /data
USER cosod
EXPOSE 9090

# The API. Workers run the same image with `command: cosod-worker`. No --preload: each gunicorn worker
# loads the pipeline itself after the fork. backend/api/gunicorn_conf.py puts the API's processes (only them:
# no ENV here, the RQ workers must not get it) in Prometheus multiprocess mode, so /metrics sums all workers.
CMD ["sh", "-c", "exec gunicorn -c python:backend.api.gunicorn_conf --bind 0.0.0.0:${PORT} --workers ${WORKERS} --threads ${THREADS} --timeout 0 'backend.api.app:create_app()'"]
