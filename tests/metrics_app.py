"""An app for real gunicorn workers in ``test_backend_metrics.py``: ``gunicorn 'metrics_app:create()'``.

A fake pipeline (no weights, ready at once), no Label Studio, no Redis; ``MODEL_DIR`` from the environment.
Every answer carries the pid of the worker that gave it in ``X-Worker-Pid``.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from flask import Flask, Response

from backend.api.app import create_app
from backend.settings import Settings


def fake_pipeline(settings: Settings) -> Any:
    return SimpleNamespace(config=SimpleNamespace(model=settings.model_name), version_id="fixed")


def create() -> Flask:
    app = create_app(Settings(model_dir=os.environ["MODEL_DIR"]), pipeline_factory=fake_pipeline)

    @app.after_request
    def _worker_pid(resp: Response) -> Response:
        resp.headers["X-Worker-Pid"] = str(os.getpid())
        return resp

    return app
