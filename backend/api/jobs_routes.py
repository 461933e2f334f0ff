"""The /jobs routes: batch pre-annotation and job status, as a Flask blueprint.

- ``POST /jobs/prelabel {"project": N, "group_by"?: a rule of backend.grouping, "groups"?: [names]}``
  -> 202 ``{"project", "jobs": [ids], "created": [ids enqueued now], "existing": [ids already there]}``
- ``GET /jobs/<id>`` -> the job (status, progress, result, error, times); 404 for an unknown id
- ``GET /jobs?project=N`` -> ``{"jobs": [...]}``
- ``GET /jobs/coverage?project=N`` -> per group: tasks with and without a prediction of the serving version,
  and its job's status (``"missing"`` when the queue forgot it; see :mod:`backend.jobs.coverage`)
- ``DELETE /jobs/<id>`` -> cancels it (a queued job is dropped, a running one stops at its next progress step)
  and answers the job plus ``was`` (its status before) and ``outcome``: ``"canceled"`` (it was queued),
  ``"stopping"`` (it was running) or ``"nothing to cancel"`` (it had already ended)

Bad input answers 4xx JSON naming the problem; a Redis outage answers 503.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Blueprint, Response, current_app, jsonify, request

from ..errors import (
    BadRequestError,
    JobNotFoundError,
    QueueDownError,
    TransientJobError,
    UnknownProjectError,
    quote,
    redact_all,
)
from ..jobs import queue as jobqueue
from ..jobs.coverage import project_coverage
from ..jobs.enqueue import enqueue_prelabel
from ..jobs.protocol import is_job_id
from ..labelstudio.protocol import parse_id
from ..settings import Settings
from .guard import json_object

log = logging.getLogger(__name__)

blueprint = Blueprint("jobs", __name__)


def _settings() -> Settings:
    return current_app.extensions["cosod"]["settings"]


def _public(job: dict) -> dict:
    """A job as a client may see it: no secret, no server folder (errors and results may name them)."""
    s = _settings()
    return redact_all(job, s.secrets, s.private_paths)


@contextmanager
def _project_errors(pid: int) -> Iterator[None]:
    """A project-wide job request's failures as answers: queue down 503, unknown project 404, else 400."""
    try:
        yield
    except (jobqueue.QueueUnavailableError, TransientJobError) as exc:
        raise QueueDownError(str(exc)) from None
    except UnknownProjectError as exc:
        raise UnknownProjectError(f"unknown project {pid}: {exc}") from None
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


def _queue() -> jobqueue.JobQueue:
    return jobqueue.get_queue(_settings())


@blueprint.post("/jobs/prelabel")
def prelabel() -> tuple[Response, int]:
    body = json_object(request)
    unknown = sorted(set(body) - {"project", "group_by", "groups"})
    if unknown:
        raise BadRequestError(f"unknown field(s) {quote(unknown)}; allowed: project, group_by, groups")
    pid = parse_id(body.get("project"), "'project'")
    group_by = body.get("group_by")
    if group_by is not None and not isinstance(group_by, str):
        raise BadRequestError(f"'group_by' must be a grouping rule (a string), got {quote(group_by)}")
    groups = body.get("groups")
    names_ok = isinstance(groups, list) and all(x is None or isinstance(x, str) for x in groups)
    if groups is not None and not names_ok:
        raise BadRequestError(f"'groups' must be a list of group names, got {quote(groups)}")
    with _project_errors(pid):
        enqueued = enqueue_prelabel(pid, group_by, groups)
    return jsonify(
        project=pid,
        jobs=[e.job_id for e in enqueued],
        created=[e.job_id for e in enqueued if e.created],
        existing=[e.job_id for e in enqueued if not e.created],
        queue=_queue().kind,
    ), 202


@blueprint.get("/jobs/coverage")
def coverage() -> Response:
    """Per group of ``?project=N``: tasks with and without a prediction of the serving version, and the
    group's job as the queue knows it (``job_status: "missing"`` when Redis forgot it)."""
    raw = request.args.get("project")
    if raw is None:
        raise BadRequestError("/jobs/coverage needs ?project=<id>")
    pid = parse_id(raw, "'project'")
    group_by = request.args.get("group_by")
    with _project_errors(pid):
        return jsonify(project_coverage(pid, group_by))


@blueprint.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    if not is_job_id(job_id):
        raise JobNotFoundError(f"no job {quote(job_id)} (not a job id)")
    try:
        info = _queue().fetch(job_id)
    except jobqueue.QueueUnavailableError as exc:
        raise QueueDownError(str(exc)) from None
    if info is None:
        raise JobNotFoundError(f"no job {quote(job_id)} (unknown, or expired after its TTL)")
    return jsonify(_public(info.to_dict()))


@blueprint.get("/jobs")
def list_jobs() -> Response:
    raw = request.args.get("project")
    pid = parse_id(raw, "'project'") if raw is not None else None
    try:
        found = _queue().list(pid)
    except jobqueue.QueueUnavailableError as exc:
        raise QueueDownError(str(exc)) from None
    return jsonify(jobs=[_public(j.to_dict()) for j in found])


@blueprint.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Response:
    if not is_job_id(job_id):
        raise JobNotFoundError(f"no job {quote(job_id)} (not a job id)")
    q = _queue()
    try:
        before = q.fetch(job_id)
        info = q.cancel(job_id) if before is not None else None
    except jobqueue.QueueUnavailableError as exc:
        raise QueueDownError(str(exc)) from None
    if before is None or info is None:
        raise JobNotFoundError(f"no job {quote(job_id)} (unknown, or expired after its TTL)")
    if before.status == "started":
        outcome = "stopping"
    else:
        outcome = "canceled" if before.status in jobqueue.ACTIVE else "nothing to cancel"
    return jsonify({**_public(info.to_dict()), "was": before.status, "outcome": outcome})
