"""Where jobs run: RQ on Redis when ``REDIS_URL`` is set, else one background thread in this process.

Both implement :class:`JobQueue`; callers get one from :func:`get_queue` and never learn which it is. A job is
a plain module-level function of ids (see :mod:`backend.jobs.prelabel`); while it runs it may call
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
  ``retries`` times. Backoff between Label Studio calls lives inside the job (:mod:`backend.jobs.context`),
  so RQ's scheduler process is not needed.
- **Cancel**: a queued job is dropped; a started one stops at its next :func:`report_progress`.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from ..errors import JobCanceledError, JobQueueError, JobTimeoutError, QueueUnavailableError
from ..settings import Settings
from .local import InProcessQueue
from .protocol import ACTIVE, Enqueued, JobInfo, JobQueue, RunningJob, running_job
from .rqueue import RQQueue, RQRunning

log = logging.getLogger(__name__)


def _current() -> RunningJob | None:
    handle = running_job.get()
    if handle is not None:
        return handle
    try:
        import rq
    except ImportError:  # pragma: no cover - rq is a backend dependency
        return None
    job = rq.get_current_job()
    return RQRunning(job) if job is not None else None


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


_queues: dict[tuple[int, str | None, str], JobQueue] = {}
_queues_lock = threading.Lock()


def get_queue(settings: Settings) -> JobQueue:
    """The process's queue: :class:`RQQueue` when ``settings.redis_url`` is set, else the one
    :class:`InProcessQueue` of this process."""
    key = (os.getpid(), settings.redis_url, settings.queue_name)
    with _queues_lock:
        q = _queues.get(key)
        if q is None:
            if settings.redis_url:
                q = RQQueue(settings.redis_url, settings.queue_name)
            else:
                q = InProcessQueue()
            _queues[key] = q
        return q


__all__ = [
    "ACTIVE",
    "Enqueued",
    "InProcessQueue",
    "JobInfo",
    "JobQueue",
    "RQQueue",
    "JobCanceledError",
    "JobQueueError",
    "JobTimeoutError",
    "QueueUnavailableError",
]
