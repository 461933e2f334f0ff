"""The in-process queue: one background thread runs the jobs of this process in order (no Redis: tests,
``make run`` without ``REDIS_URL``). Same semantics as RQ (see :mod:`backend.jobs.queue`)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import JobCanceledError, JobTimeoutError
from .protocol import ACTIVE, Enqueued, JobInfo, check_enqueue_args, func_name, iso_time, running_job

log = logging.getLogger(__name__)


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
            func=func_name(self.func),
            description=self.description,
            project=self.meta.get("project"),
            progress=self.meta.get("progress"),
            result=self.result,
            error=self.error,
            enqueued_at=iso_time(self.enqueued_at),
            started_at=iso_time(self.started_at),
            ended_at=iso_time(self.ended_at),
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
        check_enqueue_args(job_id, timeout, result_ttl, failure_ttl, retries)
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
        token = running_job.set(handle)
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
                    rec.meta["last_error"] = rec.meta.pop("error", None) or f"{type(exc).__name__}: {exc}"
                    self._pending.append(rec.id)
                    log.warning("job %s failed (%s: %s); retrying", rec.id, type(exc).__name__, exc)
                else:
                    rec.status = "failed"
                    rec.error = rec.error or f"{type(exc).__name__}: {exc}"
                    log.error("job %s failed: %s", rec.id, rec.error)
        else:
            with self._lock:
                rec.status, rec.result, rec.ended_at = "finished", result, time.time()
                rec.meta.pop("last_error", None)  # an earlier attempt's, or a retried call's: not the outcome
                rec.meta.pop("error", None)
        finally:
            running_job.reset(token)

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
