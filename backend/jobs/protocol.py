"""The job queue's protocol and records, shared by both queues (:mod:`.local`, :mod:`.rqueue`): what a
queue must do (:class:`JobQueue`), what it reports (:class:`JobInfo`), and the handle of a running job."""

from __future__ import annotations

import contextvars
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ..errors import quote

ACTIVE = ("queued", "scheduled", "deferred", "started")
CANCEL_KEY = "cosod:cancel:{}"
AHEAD_KEY = "cosod:ahead:{}"  # a worker reads this queued job's inputs ahead (one worker per job)
PEEK = 8  # queued jobs looked at by claim_next


@dataclass(frozen=True)
class JobInfo:
    """What the API reports about one job. Times are ISO 8601 UTC strings (or None)."""

    id: str
    status: str  # queued | scheduled | deferred | started | finished | failed | canceled | stopped
    func: str
    description: str | None
    project: int | None
    progress: dict[str, int] | None
    result: Any
    error: str | None
    enqueued_at: str | None
    started_at: str | None
    ended_at: str | None
    retries_left: int | None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "func": self.func,
            "description": self.description,
            "project": self.project,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
            "enqueued_at": self.enqueued_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "retries_left": self.retries_left,
            "meta": {k: v for k, v in self.meta.items() if k not in ("progress", "error", "project")},
        }


class Enqueued(NamedTuple):
    job_id: str
    created: bool  # False: a job with this id already existed (queued, running or finished)


class JobQueue(Protocol):
    kind: str  # "rq" or "inprocess"

    def enqueue(
        self,
        func: Callable[..., Any],
        *args: Any,
        job_id: str,
        timeout: int,
        result_ttl: int,
        failure_ttl: int,
        retries: int = 0,
        meta: dict[str, Any] | None = None,
        description: str | None = None,
        keep_finished: bool = True,
    ) -> Enqueued: ...

    def fetch(self, job_id: str) -> JobInfo | None: ...

    def list(self, project: int | None = None) -> list[JobInfo]: ...

    def cancel(self, job_id: str) -> JobInfo | None: ...

    def ping(self) -> str: ...

    def claim_next(self, func: Callable[..., Any], ttl: int) -> tuple[str, tuple[Any, ...]] | None: ...


def iso_time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, tz=dt.UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.isoformat(timespec="milliseconds")


def func_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


# A job id: what RQ accepts (ASCII letters, digits, '_' and '-'), at most 200 characters. Both queues hold
# to it, so a route can answer 404 for anything else without asking Redis.
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")


def is_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID.fullmatch(value) is not None


def check_enqueue_args(job_id: str, timeout: int, result_ttl: int, failure_ttl: int, retries: int) -> None:
    if not is_job_id(job_id):
        raise ValueError(f"job_id must be 1-200 ASCII letters, digits, '_' or '-', got {quote(job_id)}")
    for name, value in (("timeout", timeout), ("result_ttl", result_ttl), ("failure_ttl", failure_ttl)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries!r}")


# -- the running job's handle (both implementations) -----------------------------------------------------


class RunningJob(Protocol):
    def progress(self, done: int, total: int, extra: dict[str, Any]) -> None: ...

    def give_up(self, reason: str) -> None: ...

    def set_meta(self, values: dict[str, Any]) -> None: ...


running_job: contextvars.ContextVar[RunningJob | None] = contextvars.ContextVar(
    "cosod_running_job", default=None
)
