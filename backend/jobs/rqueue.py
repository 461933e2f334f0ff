"""The RQ queue on Redis: jobs run on ``cosod-worker`` processes (see :mod:`backend.jobs.queue` for the
shared semantics, :mod:`backend.jobs.worker` for the workers)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import JobCanceledError, JobQueueError, QueueUnavailableError, quote, redact_url
from .protocol import (
    ACTIVE,
    AHEAD_KEY,
    CANCEL_KEY,
    PEEK,
    Enqueued,
    JobInfo,
    check_enqueue_args,
    func_name,
    is_job_id,
    iso_time,
)

log = logging.getLogger(__name__)

ALIVE_KEY = "cosod:alive:{queue}"  # sorted set: worker name -> the time its liveness mark expires
MAX_DEATHS = 10  # deaths after which a job's retries are no longer given back (the job may be the killer)


def _redis_now(connection: Any) -> float:
    """Redis's clock: workers and the API on different machines agree on it."""
    seconds, micros = connection.time()
    return float(seconds) + float(micros) / 1e6


def mark_alive(connection: Any, queue_name: str, name: str, ttl: float) -> None:
    """This worker is alive for ``ttl`` more seconds (renewed every heartbeat)."""
    key = ALIVE_KEY.format(queue=queue_name)
    deadline = _redis_now(connection) + ttl
    with connection.pipeline(transaction=False) as pipe:
        pipe.zadd(key, {name: deadline})
        pipe.expire(key, max(60, int(ttl) * 10))  # an abandoned queue's set goes away
        pipe.execute()


def unmark_alive(connection: Any, queue_name: str, name: str) -> None:
    connection.zrem(ALIVE_KEY.format(queue=queue_name), name)


def count_alive(connection: Any, queue_name: str) -> int:
    """How many workers of ``queue_name`` marked themselves alive within their TTL: expired marks are
    dropped and never counted, so a killed worker cannot linger; the cost is that of the workers, not of
    the database."""
    key = ALIVE_KEY.format(queue=queue_name)
    now = _redis_now(connection)
    with connection.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zcount(key, now, "+inf")
        return int(pipe.execute()[1])


DEATH_KEY = "cosod:death:{}"  # one per abandoned execution, so that its death is counted once


def credit_deaths(connection: Any, queue: Any, now: float | None = None) -> int:
    """:func:`credit_death` for each execution of ``queue``'s started registry whose heartbeat expired
    before ``now``, once per execution whoever calls it (RQ's clean-up runs in every worker)."""
    from rq.registry import StartedJobRegistry
    from rq.utils import current_timestamp

    registry = StartedJobRegistry(queue=queue)
    entries = connection.zrangebyscore(registry.key, 0, current_timestamp() if now is None else now)
    credited = 0
    for raw in entries:
        entry = raw.decode() if isinstance(raw, bytes) else str(raw)
        if connection.set(DEATH_KEY.format(entry), 1, nx=True, ex=7 * 24 * 3600):
            credit_death(connection, registry.parse_job_id(raw))
            credited += 1
    return credited


def credit_death(connection: Any, job_id: str, requeued: bool = False) -> None:
    """A job whose worker stopped heartbeating: count the death in its meta and give back the retry that
    RQ's re-queue uses (``requeued``: it already did, from a clean-up that did not count it), so that
    deaths never use up ``COSOD_JOB_RETRIES``, up to :data:`MAX_DEATHS`. A job being canceled or given up
    gets no retry: its ``retries_left`` is set to 0 in Redis (the worker that set it died)."""
    from rq.exceptions import NoSuchJobError
    from rq.job import Job, JobStatus

    try:
        job = Job.fetch(job_id, connection=connection)
    except (NoSuchJobError, ValueError, TypeError, KeyError, AttributeError):
        return
    if not requeued and job.get_status(refresh=False) != JobStatus.STARTED:
        return
    meta = job.meta
    deaths = int(meta.get("deaths", 0)) + 1
    meta["deaths"] = deaths
    meta.pop("running", None)  # counted: the next run's start must not count it again
    meta["last_error"] = f"its worker died during run {meta.get('attempt', 1)} (death {deaths})"
    given_up = meta.get("cancel_requested") or meta.get("permanent")
    credit = deaths <= MAX_DEATHS and not given_up
    job.save_meta()
    if given_up:
        connection.hset(job.key, "retries_left", 0)
    elif credit:
        connection.hset(job.key, "retries_left", (job.retries_left or 0) + 1)
    log.warning(
        "job %s: its worker died (death %d)%s",
        job_id,
        deaths,
        "; it runs again without using a retry" if credit else "",
    )


def _status(job: Any) -> str:
    """RQ's JobStatus enum (or None) as its plain value: queued, started, finished..."""
    status = job.get_status(refresh=False)
    return str(getattr(status, "value", status) or "unknown")


class RQRunning:
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
        self.job.meta["permanent"] = True
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
        where = redact_url(self.url)
        return QueueUnavailableError(
            f"Redis at {where} is unreachable: {exc.__class__.__name__}: {redact_url(str(exc))}"
        )

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

        check_enqueue_args(job_id, timeout, result_ttl, failure_ttl, retries)
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

        name = func_name(func)
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
            enqueued_at=iso_time(job.enqueued_at),
            started_at=iso_time(job.started_at),
            ended_at=iso_time(job.ended_at),
            retries_left=job.retries_left,
            meta=meta,
        )

    def _readable(self, job_id: str) -> Any:
        """The RQ job ``job_id``, or None when there is none or its key does not hold a job RQ can read
        (another program's key, a damaged hash: logged, never raised); raises QueueUnavailableError when
        Redis is down."""
        import redis
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        if not is_job_id(job_id):
            return None
        try:
            job = Job.fetch(job_id, connection=self.connection)
            self._info(job)
            return job
        except NoSuchJobError:
            return None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from None
        except (redis.ResponseError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("rq:job:%s is not a readable job, skipped: %s", job_id, quote(str(exc)))
            return None

    def fetch(self, job_id: str) -> JobInfo | None:
        job = self._readable(job_id)
        return None if job is None else self._info(job)

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
                # cleanup=False: listing never reaps; the workers' reaper does, counting deaths apart
                ids.extend(registry.get_job_ids(cleanup=False))
            unique = list(dict.fromkeys(ids))
            jobs = Job.fetch_many(unique, connection=self.connection)
            out = [self._info(j) for j in jobs if j is not None]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from None
        except (redis.ResponseError, ValueError, TypeError, KeyError, AttributeError):
            # one unreadable key spoils the pipelined read: read them one by one, skipping those
            out = [self._info(j) for j in map(self._readable, unique) if j is not None]
        out = [j for j in out if project is None or j.project == project]
        return sorted(out, key=lambda j: j.enqueued_at or "")

    def cancel(self, job_id: str) -> JobInfo | None:
        import redis
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        job = self._readable(job_id)
        if job is None:
            return None
        try:
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
