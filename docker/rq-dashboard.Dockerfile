# rq-dashboard for the compose stack, from requirements/rq-dashboard.txt (exact versions, hash-checked;
# `make lock` writes it with the lock's rq and redis), on the same base image as the backend.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY requirements/rq-dashboard.txt /tmp/rq-dashboard.txt
RUN python3 -m venv /opt/venv \
    && pip install --require-hashes --no-deps -r /tmp/rq-dashboard.txt \
    && pip check \
    && useradd --create-home --uid 1000 dashboard
USER dashboard
EXPOSE 9181
# RQ_DASHBOARD_REDIS_URL, RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD come from the environment
CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181"]
