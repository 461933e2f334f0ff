"""Where jobs run: RQ on Redis when ``REDIS_URL`` is set, else one background thread in this process.

Both implement :class:`JobQueue`; callers get one from :func:`get_queue` and never learn which it is. A job is
a plain module-level function of ids (see ``backend/jobs.py``); while it runs it may call
:func:`report_progress` (progress lands in RQ's ``job.meta`` or in the in-process record) and
:func:`give_up` (a permanent failure: no retry).

Semantics shared by both:

- **Deterministic ids dedup.** ``enqueue(..., job_id=X)`` does nothing when a job ``X`` is queued, scheduled,
  started, or finished (``keep_finished=True``, the default; ``False`` lets a finished job be run again, e.g.
  one fine-tune per project at a time). A failed or canceled ``X`` is replaced. In RQ the check-and-save is
  atomic (``unique=True``), so two API processes cannot both enqueue ``X``.
- **Timeouts and TTLs** are explicit per job: ``timeout`` (RQ kills the job; in-process the next
  :func:`report_progress` past it raises :class:`JobTimeoutError`), ``result_ttl`` and ``failure_ttl``.
- **Retries**: a job that raises (other than after :func:`give_up`), or whose worker died, runs again up to
  ``retries`` times. Backoff between Label Studio calls lives inside the job (``backend/jobs.py``), so RQ's
  scheduler process is not needed.
- **Cancel**: a queued job is dropped; a started one stops at its next :func:`report_progress`.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from .settings import Settings

log = logging.getLogger(__name__)

ACTIVE = ("queued", "scheduled", "deferred", "started")
CANCEL_KEY = "cosod:cancel:{}"
AHEAD_KEY = "cosod:ahead:{}"  # a worker reads this queued job's inputs ahead (one worker per job)
PEEK = 8  # queued jobs looked at by claim_next


class JobQueueError(Exception):
    """Base class of the queue's own errors."""


class QueueUnavailableError(JobQueueError):
    """Redis cannot be reached (the message names the URL)."""


class JobCanceledError(JobQueueError):
    """Raised inside a running job by :func:`report_progress` after a cancel request."""


class JobTimeoutError(JobQueueError):
    """Raised inside an in-process job by :func:`report_progress` once it ran past its timeout."""


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


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, tz=dt.UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.isoformat(timespec="milliseconds")


def _status(job: Any) -> str:
    """RQ's JobStatus enum (or None) as its plain value: queued, started, finished..."""
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status) or "unknown")


def _func_name(func: Callable[..., Any]) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def _check_enqueue_args(job_id: str, timeout: int, result_ttl: int, failure_ttl: int, retries: int) -> None:
    if not job_id or not all(c.isalnum() or c in "-_.:" for c in job_id):
        raise ValueError(f"job_id must be letters, digits, '-', '_', '.' or ':', got {job_id!r}")
    for name, value in (("timeout", timeout), ("result_ttl", result_ttl), ("failure_ttl", failure_ttl)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries!r}")


# -- the running job's handle (both implementations) -----------------------------------------------------


class _Running(Protocol):
    def progress(self, done: int, total: int, extra: dict[str, Any]) -> None: ...

    def give_up(self, reason: str) -> None: ...

    def set_meta(self, values: dict[str, Any]) -> None: ...


_running: contextvars.ContextVar[_Running | None] = contextvars.ContextVar("cosod_running_job", default=None)


def _current() -> _Running | None:
    handle = _running.get()
    if handle is not None:
        return handle
    try:
        import rq
    except ImportError:  # pragma: no cover - rq is a backend dependency
        return None
    job = rq.get_current_job()
    return _RQRunning(job) if job is not None else None


def report_progress(done: int, total: int, **extra: Any) -> None:
    """Record ``done`` of ``total`` items (and any ``extra`` meta) for the running job; a no-op outside a
    job. Raises :class:`JobCanceledError` after a cancel request, :class:`JobTimeoutError` past the
    in-process timeout."""
    if done < 0 or total < 0 or done > total:
        raise ValueError(f"progress must satisfy 0 <= done <= total, got done={done!r} total={total!r}")
    handle = _current()
    if handle is not None:
        handle.progress(int(done), int(total), extra)


def set_meta(**values: Any) -> None:
    """Store extra meta on the running job (a no-op outside a job)."""
    handle = _current()
    if handle is not None:
        handle.set_meta(values)


def give_up(reason: str) -> None:
    """Mark the running job's failure as permanent: it is not retried, and ``reason`` is its error."""
    handle = _current()
    if handle is not None:
        handle.give_up(reason)


# -- in-process --------------------------------------------------------------------------------------


@dataclass
class _Record:
    id: str
    func: Callable[..., Any]
    args: tuple[Any, ...]
    timeout: int
    result_ttl: int
    failure_ttl: int
    retries_left: int
    description: str | None
    meta: dict[str, Any]
    status: str = "queued"
    result: Any = None
    error: str | None = None
    enqueued_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    cancel_requested: bool = False
    permanent: bool = False

    def info(self) -> JobInfo:
        return JobInfo(
            id=self.id,
            status=self.status,
            func=_func_name(self.func),
            description=self.description,
            project=self.meta.get("project"),
            progress=self.meta.get("progress"),
            result=self.result,
            error=self.error,
            enqueued_at=_iso(self.enqueued_at),
            started_at=_iso(self.started_at),
            ended_at=_iso(self.ended_at),
            retries_left=self.retries_left,
            meta=dict(self.meta),
        )


class _LocalRunning:
    def __init__(self, record: _Record, lock: threading.Lock):
        self.record = record
        self.lock = lock
        self.t0 = time.monotonic()

    def progress(self, done: int, total: int, extra: dict[str, Any]) -> None:
        with self.lock:
            self.record.meta.update(extra)
            self.record.meta["progress"] = {"done": done, "total": total}
        if self.record.cancel_requested:
            raise JobCanceledError(f"job {self.record.id} was canceled")
        if time.monotonic() - self.t0 > self.record.timeout:
            raise JobTimeoutError(f"job {self.record.id} ran past its timeout of {self.record.timeout} s")

    def give_up(self, reason: str) -> None:
        self.record.permanent = True
        self.record.error = reason

    def set_meta(self, values: dict[str, Any]) -> None:
        with self.lock:
            self.record.meta.update(values)


class InProcessQueue:
    """The embedded default: jobs run one at a time in a daemon thread of this process."""

    kind = "inprocess"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._records: dict[str, _Record] = {}
        self._pending: deque[str] = deque()
        self._thread: threading.Thread | None = None

    def ping(self) -> str:
        return "in-process"

    def _purge(self) -> None:
        now = time.time()
        for rid, rec in list(self._records.items()):
            ttl = rec.result_ttl if rec.status == "finished" else rec.failure_ttl
            if rec.ended_at is not None and now - rec.ended_at > ttl:
                del self._records[rid]

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
    ) -> Enqueued:
        _check_enqueue_args(job_id, timeout, result_ttl, failure_ttl, retries)
        with self._lock:
            self._purge()
            old = self._records.get(job_id)
            if old is not None and (old.status in ACTIVE or (keep_finished and old.status == "finished")):
                return Enqueued(job_id, False)
            self._records[job_id] = _Record(
                job_id, func, args, timeout, result_ttl, failure_ttl, retries, description, dict(meta or {})
            )
            self._pending.append(job_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cosod-jobs", daemon=True)
                self._thread.start()
            self._wake.notify()
        return Enqueued(job_id, True)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._wake.wait()
                rec = self._records.get(self._pending.popleft())
                if rec is None or rec.status != "queued":
                    continue
                rec.status, rec.started_at, rec.ended_at = "started", time.time(), None
            self._execute(rec)

    def _execute(self, rec: _Record) -> None:
        handle = _LocalRunning(rec, self._lock)
        token = _running.set(handle)
        try:
            result = rec.func(*rec.args)
        except Exception as exc:
            with self._lock:
                rec.ended_at = time.time()
                if isinstance(exc, JobCanceledError) or rec.cancel_requested:
                    rec.status, rec.error = "canceled", rec.error or "canceled by request"
                elif rec.retries_left > 0 and not rec.permanent and not isinstance(exc, JobTimeoutError):
                    rec.retries_left -= 1
                    rec.status, rec.error = "queued", None
                    rec.meta["attempt"] = rec.meta.get("attempt", 1) + 1
                    self._pending.append(rec.id)
                    log.warning("job %s failed (%s: %s); retrying", rec.id, type(exc).__name__, exc)
                else:
                    rec.status = "failed"
                    rec.error = rec.error or f"{type(exc).__name__}: {exc}"
                    log.error("job %s failed: %s", rec.id, rec.error)
        else:
            with self._lock:
                rec.status, rec.result, rec.ended_at = "finished", result, time.time()
        finally:
            _running.reset(token)

    def claim_next(self, func: Callable[..., Any], ttl: int) -> tuple[str, tuple[Any, ...]] | None:
        """The id and arguments of the first queued job of ``func`` (one thread runs them all here, so
        whatever is read ahead for it is used)."""
        with self._lock:
            for rid in self._pending:
                rec = self._records.get(rid)
                if rec is not None and rec.status == "queued" and rec.func is func:
                    return rid, rec.args
        return None

    def fetch(self, job_id: str) -> JobInfo | None:
        with self._lock:
            self._purge()
            rec = self._records.get(job_id)
            return rec.info() if rec else None

    def list(self, project: int | None = None) -> list[JobInfo]:
        with self._lock:
            self._purge()
            recs = sorted(self._records.values(), key=lambda r: r.enqueued_at)
            return [r.info() for r in recs if project is None or r.meta.get("project") == project]

    def cancel(self, job_id: str) -> JobInfo | None:
        with self._lock:
            rec = self._records.get(job_id)
            if rec is None:
                return None
            if rec.status in ("queued", "scheduled", "deferred"):
                rec.status, rec.error, rec.ended_at = "canceled", "canceled by request", time.time()
            elif rec.status == "started":
                rec.cancel_requested = True
            return rec.info()

    def wait_idle(self, timeout: float) -> bool:
        """Test helper: True once no job is queued or running (within ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not any(r.status in ACTIVE for r in self._records.values()):
                    return True
            time.sleep(0.02)
        return False


# -- RQ ------------------------------------------------------------------------------------------------


class _RQRunning:
    def __init__(self, job: Any):
        self.job = job

    def progress(self, done: int, total: int, extra: dict[str, Any]) -> None:
        self.job.meta.update(extra)
        self.job.meta["progress"] = {"done": done, "total": total}
        self.job.save_meta()
        if self.job.connection.exists(CANCEL_KEY.format(self.job.id)):
            self.job.retries_left = 0
            self.job.meta.update(cancel_requested=True, error="canceled by request")
            self.job.save_meta()
            raise JobCanceledError(f"job {self.job.id} was canceled")

    def give_up(self, reason: str) -> None:
        self.job.retries_left = 0
        self.job.meta["error"] = reason
        self.job.save_meta()

    def set_meta(self, values: dict[str, Any]) -> None:
        self.job.meta.update(values)
        self.job.save_meta()


def redis_connection(url: str) -> Any:
    """A Redis client with short connect timeouts and retries on connection errors (reconnects after a
    Redis restart on the next command)."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=30,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _delete_job(job: Any) -> None:
    """``job.delete()``, also for a job whose worker was killed.

    rq 3 keeps an execution's id in the job's execution registry 60 s longer than the execution's own hash
    (the registry's score is the hash's TTL + 60), and ``Job.delete`` fetches every listed execution, so for
    about a minute after a killed worker's execution expired it raises ``ValueError: Execution ... not found
    in Redis``. The ids whose hash is gone are dropped from the registry first; the rest is rq's own delete.
    ``tests/test_backend_queue_rq.py`` fails if this layout changes.
    """
    from rq.executions import Execution, ExecutionRegistry

    registry = ExecutionRegistry(job_id=job.id, connection=job.connection)
    stale = [
        eid
        for eid in registry.get_execution_ids()
        if not job.connection.exists(Execution(id=eid, job_id=job.id, connection=job.connection).key)
    ]
    if stale:
        job.connection.zrem(registry.key, *stale)
    job.delete()


class RQQueue:
    """Jobs on the RQ queue ``settings.queue_name``; ``cosod-worker`` processes run them."""

    kind = "rq"

    def __init__(self, url: str, name: str):
        from rq import Queue

        self.url = url
        self.connection = redis_connection(url)
        self.queue = Queue(name, connection=self.connection)

    def _unavailable(self, exc: Exception) -> QueueUnavailableError:
        return QueueUnavailableError(f"Redis at {self.url} is unreachable: {exc.__class__.__name__}: {exc}")

    def ping(self) -> str:
        import redis

        try:
            self.connection.ping()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None
        return "ok"

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
    ) -> Enqueued:
        import redis
        from rq import Retry
        from rq.exceptions import DuplicateJobError, NoSuchJobError
        from rq.job import Job

        _check_enqueue_args(job_id, timeout, result_ttl, failure_ttl, retries)
        try:
            for _ in range(3):
                try:
                    self.queue.enqueue_call(
                        func,
                        args=args,
                        job_id=job_id,
                        timeout=timeout,
                        result_ttl=result_ttl,
                        failure_ttl=failure_ttl,
                        retry=Retry(max=retries) if retries else None,
                        meta={**(meta or {}), "attempt": 1},
                        description=description,
                        unique=True,
                    )
                    self.connection.delete(CANCEL_KEY.format(job_id))
                    return Enqueued(job_id, True)
                except DuplicateJobError:
                    try:
                        old = Job.fetch(job_id, connection=self.connection)
                    except NoSuchJobError:
                        continue  # expired in between: try again
                    status = _status(old)
                    if status in ACTIVE or (keep_finished and status == "finished"):
                        return Enqueued(job_id, False)
                    _delete_job(old)  # failed, canceled or stopped: replace it
            raise JobQueueError(f"could not enqueue job {job_id!r}: it kept changing state")
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None

    def claim_next(self, func: Callable[..., Any], ttl: int) -> tuple[str, tuple[Any, ...]] | None:
        """The id and arguments of the first of the next :data:`PEEK` queued jobs of ``func`` that no other
        worker claimed; the claim lasts ``ttl`` seconds. Any Redis trouble answers None (reading ahead is
        only an optimisation)."""
        import redis
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        name = _func_name(func)
        try:
            for job_id in self.queue.get_job_ids(0, PEEK - 1):
                try:
                    job = Job.fetch(job_id, connection=self.connection)
                except NoSuchJobError:
                    continue
                if job.func_name != name:
                    continue
                if self.connection.set(AHEAD_KEY.format(job_id), os.getpid(), nx=True, ex=ttl):
                    return job_id, tuple(job.args)
        except (redis.RedisError, ValueError, TypeError) as exc:
            log.debug("no job to read ahead for: %s", exc)
        return None

    def _info(self, job: Any) -> JobInfo:
        status = _status(job)
        meta = dict(job.meta or {})
        error = meta.get("error")
        if status in ("failed", "stopped", "canceled") and not error:
            latest = job.latest_result()
            exc = getattr(latest, "exc_string", None) or ""
            lines = [ln for ln in exc.strip().splitlines() if ln.strip()]
            error = lines[-1] if lines else f"job {status}"
        if status == "failed" and meta.get("cancel_requested"):
            status = "canceled"
        try:
            result = job.return_value() if status == "finished" else None
        except Exception:
            result = None
        return JobInfo(
            id=job.id,
            status=status,
            func=job.func_name,
            description=job.description,
            project=meta.get("project"),
            progress=meta.get("progress"),
            result=result,
            error=error if status != "finished" else None,
            enqueued_at=_iso(job.enqueued_at),
            started_at=_iso(job.started_at),
            ended_at=_iso(job.ended_at),
            retries_left=job.retries_left,
            meta=meta,
        )

    def fetch(self, job_id: str) -> JobInfo | None:
        import redis
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            return self._info(Job.fetch(job_id, connection=self.connection))
        except NoSuchJobError:
            return None
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None

    def list(self, project: int | None = None) -> list[JobInfo]:
        import redis
        from rq.job import Job

        q = self.queue
        try:
            ids: list[str] = list(q.get_job_ids())
            for registry in (
                q.scheduled_job_registry,
                q.started_job_registry,
                q.finished_job_registry,
                q.failed_job_registry,
                q.canceled_job_registry,
            ):
                ids.extend(registry.get_job_ids())
            jobs = Job.fetch_many(list(dict.fromkeys(ids)), connection=self.connection)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None
        out = [self._info(j) for j in jobs if j is not None]
        out = [j for j in out if project is None or j.project == project]
        return sorted(out, key=lambda j: j.enqueued_at or "")

    def cancel(self, job_id: str) -> JobInfo | None:
        import redis
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        try:
            job = Job.fetch(job_id, connection=self.connection)
            status = _status(job)
            if status in ("queued", "scheduled", "deferred"):
                job.meta["error"] = "canceled by request"
                job.save_meta()
                job.cancel()
            elif status == "started":
                job.meta["cancel_requested"] = True
                job.meta["error"] = "canceled by request"
                job.save_meta()
                self.connection.set(CANCEL_KEY.format(job_id), 1, ex=max(job.timeout or 3600, 60) + 60)
            return self._info(Job.fetch(job_id, connection=self.connection))
        except NoSuchJobError:
            return None
        except redis.RedisError as exc:
            raise self._unavailable(exc) from None


# -- selection -----------------------------------------------------------------------------------------

_queues: dict[tuple[int, str | None, str], JobQueue] = {}
_queues_lock = threading.Lock()


def get_queue(settings: Settings) -> JobQueue:
    """The process's queue: :class:`RQQueue` when ``settings.redis_url`` is set, else the one
    :class:`InProcessQueue` of this process."""
    key = (os.getpid(), settings.redis_url, settings.queue_name)
    with _queues_lock:
        q = _queues.get(key)
        if q is None:
            q = RQQueue(settings.redis_url, settings.queue_name) if settings.redis_url else InProcessQueue()
            _queues[key] = q
        return q
