"""The Label Studio ML backend protocol on Flask: /health, /setup, /predict, /webhook, /versions, /metrics
(and the blueprints of :mod:`.jobs_routes` and :mod:`.versions_routes`: /jobs, POST /versions/promote).

:func:`create_app` is the composition root of the API process: it builds the model
(:func:`backend.prediction.build_model`, with the fine-tune trigger of :mod:`backend.jobs.enqueue`),
installs the job context and registers the routes. Serve with
``gunicorn -c python:backend.api.gunicorn_conf --workers 1 --threads 4 --timeout 0
'backend.api.app:create_app()'`` (no ``--preload``: each worker loads the backbone itself, in a background
thread started here; the config file makes ``/metrics`` sum all workers, see ``backend/metrics.py``). Every
error reaches the client as JSON ``{"error": ..., "status": ...}``; tracebacks stay in the log.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import BackendError, BadRequestError, quote, redact, redact_all
from ..jobs.context import JobContext, install_context
from ..jobs.finetuning import recover_finetunes, schedule_finetune
from ..jobs.propagation import schedule_propagation
from ..jobs.rqueue import count_alive
from ..labelstudio.protocol import LEARNING_EVENTS, parse_id
from ..metrics import CONTENT_TYPE, Metrics, VersionsCollector
from ..prediction import build_model
from ..prediction.interactive import predict_interactive
from ..prediction.pipelines import PipelineFactory, PipelineLoader
from ..settings import Settings
from .guard import action_label, authorized, json_object, method_label
from .health import health_body, status_line
from .jobs_routes import blueprint as jobs_blueprint
from .versions_routes import blueprint as versions_blueprint

log = logging.getLogger(__name__)


class RedisProbe:
    """Pings REDIS_URL for /health with short timeouts; ``None`` when Redis is not configured."""

    def __init__(self, url: str | None):
        self.url = url
        self._client: Any = None

    def workers(self, queue_name: str) -> int | None:
        """How many ``cosod-worker`` processes of ``queue_name`` heartbeated within their heartbeat TTL
        (None when Redis is not configured or down). RQ's own worker records live 7 minutes after a kill
        and vanish with a Redis restart; the liveness marks expire (see :mod:`backend.jobs.worker`)."""
        if not self.url or self._client is None:
            return None
        try:
            return count_alive(self._client, queue_name)
        except Exception:
            return None

    def check(self) -> str | None:
        if not self.url:
            return None
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url, socket_connect_timeout=0.3, socket_timeout=0.3)
            self._client.ping()
            return "ok"
        except Exception as exc:
            return f"unreachable ({exc.__class__.__name__}: {redact(str(exc))})"


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
        )
    logging.getLogger("backend").setLevel(level)


def _publish_readiness(loader: PipelineLoader, metrics: Metrics) -> None:
    """Set ``backbone_ready`` each time a load of the default pipeline ends (1 ready, 0 failed; a failed
    load is retried when its files change), so that in multiprocess mode a worker's value is right even if
    it never answered ``/metrics`` itself."""
    loader.on_settled = lambda state: metrics.backbone_ready.set(1.0 if state == "ready" else 0.0)


def create_app(settings: Settings | None = None, pipeline_factory: PipelineFactory | None = None) -> Flask:
    """Build the app. ``settings`` default to the environment; ``pipeline_factory(settings)`` builds the
    pipeline (default: ``cosod.pipeline.Pipeline.build``) and runs once, in a background thread."""
    settings = settings or Settings.from_env()
    _configure_logging(settings.log_level)
    metrics = Metrics()
    model = build_model(
        settings,
        pipeline_factory,
        metrics,
        schedule_finetune=partial(schedule_finetune, settings),
        schedule_propagation=partial(schedule_propagation, settings),
    )
    loader, ls = model.loader, model.ls
    metrics.add_shared_collector(VersionsCollector(model.versions))
    redis_probe = RedisProbe(settings.redis_url)
    install_context(JobContext.of(model))
    if not settings.redis_url:  # in-process jobs died with the last process: redo its killed fine-tunes
        recover_finetunes()

    app = Flask(__name__)
    app.config["JSON_SORT_KEYS"] = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.extensions["cosod"] = {
        "settings": settings,
        "model": model,
        "loader": loader,
        "ls": ls,
        "metrics": metrics,
    }
    _publish_readiness(loader, metrics)
    loader.ensure_started()
    app.register_blueprint(jobs_blueprint)
    app.register_blueprint(versions_blueprint)

    @app.before_request
    def _before() -> Response | None:
        g.t0 = time.perf_counter()
        loader.ensure_started()
        if not authorized(request, settings):
            resp = jsonify(error="authentication required (HTTP basic auth)", status=401)
            resp.status_code = 401
            resp.headers["WWW-Authenticate"] = 'Basic realm="cosod-ml-backend"'
            return resp
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        status = str(resp.status_code)
        metrics.requests.labels(method=method_label(request.method), route=route, status=status).inc()
        if "t0" in g:
            metrics.request_seconds.labels(route=route).observe(time.perf_counter() - g.t0)
        return resp

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError) -> Response:
        kind = type(exc).__name__
        metrics.errors.labels(kind=kind).inc()
        message = redact(str(exc), settings.secrets, settings.private_paths)
        log.warning("%s %s -> %d %s: %s", request.method, quote(request.path), exc.status, kind, message)
        resp = jsonify(error=message, type=kind, status=exc.status)
        resp.status = status_line(exc.status, message)  # Label Studio shows the reason phrase, not the body
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = exc.code or 500
        metrics.errors.labels(kind=f"http_{code}" if code in (400, 401, 404, 405, 413, 415) else "http").inc()
        message = exc.description or exc.name
        if code == 413:
            message = f"the request body is over COSOD_MAX_BODY_BYTES ({settings.max_body_bytes} bytes)"
        return jsonify(error=message, status=code), code

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        metrics.errors.labels(kind="internal").inc()
        log.exception("unexpected error on %s %s", method_label(request.method), quote(request.path))
        return jsonify(
            error=f"internal error ({exc.__class__.__name__}); see the backend log", status=500
        ), 500

    @app.get("/")
    @app.get("/health")
    def health() -> Response:
        body, _, line = health_body(
            settings, loader, redis_probe.check(), partial(redis_probe.workers, settings.queue_name)
        )
        resp = jsonify(body)
        resp.status = line  # the reason phrase: what Label Studio's connect dialog shows
        return resp

    @app.post("/setup")
    def setup() -> Response:
        body = json_object(request)
        if "project" not in body:
            raise BadRequestError("/setup needs 'project' ('<id>.<timestamp>')")
        pid = parse_id(body["project"], "'project'")
        schema = body.get("schema")
        if schema is not None and not isinstance(schema, str):
            raise BadRequestError(
                f"'schema' must be the label config XML string, got {type(schema).__name__}"
            )
        version = model.setup(pid, schema, body.get("extra_params"), body.get("access_token"))
        return jsonify(model_version=version)

    @app.post("/predict")
    def predict() -> Response:
        body = json_object(request)
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise BadRequestError("/predict needs 'tasks', a non-empty list of Label Studio tasks")
        raw_project = body.get("project")
        if raw_project is None and isinstance(tasks[0], dict):
            raw_project = tasks[0].get("project")
        if raw_project is None:
            raise BadRequestError("/predict needs 'project' ('<id>.<timestamp>')")
        label_config = body.get("label_config")
        if label_config is not None and not isinstance(label_config, str):
            raise BadRequestError("'label_config' must be the label config XML string")
        project = model.project(parse_id(raw_project, "'project'"), label_config)
        raw_params = body.get("params")
        params = raw_params if isinstance(raw_params, dict) else {}
        answer = predict_interactive(model, tasks, project=project, context=params.get("context"))
        if answer is not None:  # prompts of Label Studio's smart tools (backend/prediction/interactive.py)
            return jsonify(answer)
        items, errors = model.predict(tasks, project=project, context=params.get("context"))
        out: dict[str, Any] = {"results": items}
        if errors:
            out["errors"] = errors
        return jsonify(out)

    @app.post("/webhook")
    def webhook() -> tuple[Response, int]:
        body = json_object(request)
        action = body.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequestError("/webhook needs 'action' (e.g. ANNOTATION_CREATED)")
        metrics.webhook_events.labels(action=action_label(action)).inc()
        if action_label(action) == "other":  # not a Label Studio event: nothing to do, nothing echoed
            log.info("webhook: unknown action %s ignored", quote(action))
            return jsonify(status="ignored", action="other"), 200
        info = model.fit(action, body)
        status = "ok" if action in LEARNING_EVENTS else "ignored"
        return jsonify(status=status, **info), 200

    @app.get("/versions")
    def versions() -> Response:
        raw = request.args.get("project")
        if raw is None and request.get_data(cache=True):  # Label Studio's GET has no body; old clients POSTed
            raw = json_object(request).get("project")
        pid = parse_id(raw, "'project'") if raw is not None else None
        projects = model.versions(pid)
        names = [p["active"] for p in projects]
        for p in projects:
            names += [r["version"] for r in p["versions"] if r["version"] not in names]
        return jsonify(
            versions=names,
            model_version=projects[0]["active"] if len(projects) == 1 else None,
            projects=redact_all(projects, settings.secrets, settings.private_paths),
        )

    @app.get("/metrics")
    def metrics_route() -> Response:
        metrics.backbone_ready.set(1.0 if loader.state == "ready" else 0.0)
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)

    return app
