"""A worker's Redis connection that outlives a Redis outage.

RQ talks to Redis at every step of a job: the job's progress, the heartbeats, the success or failure
bookkeeping at its end, the next dequeue. With the API's connection (three quick retries) a Redis restart
during a job made one of those calls raise, RQ's own failure handling then failed too, and the worker left
its ``work()`` loop and exited: the queue stalled until someone restarted it.

:class:`OutageRetry` is a ``redis.retry.Retry`` for the worker's connection. A command that fails because
Redis cannot be reached (connection refused or reset, a timeout) is tried again with exponential backoff
(0.1 s doubling up to 2 s) for as long as the outage lasts, up to ``COSOD_REDIS_OUTAGE_WAIT`` seconds per
command; the outage is logged once when it starts and once when it ends. Whatever the worker was doing
(a job's progress write, RQ's end-of-job bookkeeping, a heartbeat, the idle dequeue) simply resumes where it
stopped, so the job ends once: finished, or failed and re-queued by RQ's own retry rules. With a Redis that
keeps its data (AOF, the compose file's setting) the job's record is intact; with one that restarted empty
the job writes its whole record back when it ends, and the jobs still queued are gone (``GET
/jobs/coverage`` shows what they left undone; asking again redoes it).

Only after ``COSOD_REDIS_OUTAGE_WAIT`` seconds of one unbroken outage (one clock per process, so nested and
later calls do not start their own) does the error reach RQ; a worker in a job then exits with status 1
(see :mod:`backend.jobs.worker`), for its supervisor to restart it. An idle worker keeps waiting: RQ's
dequeue loop retries on its own, and it has nothing to lose.

Why a subclass rather than redis-py's ``Retry(backoff, retries)``: that one counts tries, not time, and says
nothing when it starts or stops waiting; the worker needs "wait up to N seconds, and log it".
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, socket.timeout, ConnectionError, OSError)


class OutageState:
    """When the current outage began (shared by every connection of a process), for logging once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.since: float | None = None
        self.last_ended: float | None = None  # monotonic time the last outage ended
        self.outages = 0

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self.since is None:
                self.since = time.monotonic()
                self.outages += 1
                log.warning(
                    "Redis is unreachable (%s: %s); waiting for it to come back", type(exc).__name__, exc
                )

    def succeeded(self) -> None:
        if self.since is None:  # the common case: no lock taken
            return
        with self._lock:
            if self.since is not None:
                now = time.monotonic()
                log.warning("Redis is back after %.1f s", now - self.since)
                self.since, self.last_ended = None, now

    def waited(self) -> float:
        """Seconds since the current outage began (0 when there is none)."""
        since = self.since
        return 0.0 if since is None else time.monotonic() - since

    def quiet_for(self) -> float:
        """Seconds since the last outage ended (infinite when there was none); 0 during one."""
        with self._lock:
            if self.since is not None:
                return 0.0
            return float("inf") if self.last_ended is None else time.monotonic() - self.last_ended


STATE = OutageState()


class OutageRetry(Retry):
    """Retry a Redis command while Redis is unreachable, for up to ``wait`` seconds of outage."""

    def __init__(self, wait: float, state: OutageState = STATE, cap: float = 2.0, base: float = 0.1):
        super().__init__(
            ExponentialBackoff(cap=cap, base=base),
            retries=-1,
            supported_errors=(RedisConnectionError, RedisTimeoutError, socket.timeout),
        )
        self.wait = float(wait)
        self.state = state
        self._cap, self._base = cap, base

    def __deepcopy__(self, memo: dict[int, Any]) -> OutageRetry:
        """redis-py copies the retry into each connection; the copies share the process's outage state."""
        return OutageRetry(self.wait, self.state, self._cap, self._base)

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        self._backoff.reset()
        failures = 0
        while True:
            try:
                result = do()
            except self._supported_errors as exc:
                if is_retryable is not None and not is_retryable(exc):
                    raise
                failures += 1
                if with_failure_count:
                    fail(exc, failures)
                else:
                    fail(exc)
                # one clock per outage, shared by every call of the process (nested ones included: a
                # command's health check, RQ's teardown after a job gave up): past the deadline each
                # call fails at its first error, so the worker exits about COSOD_REDIS_OUTAGE_WAIT after
                # the outage began
                self.state.failed(exc)
                waited = self.state.waited()
                if waited >= self.wait:
                    log.error("Redis unreachable for %.0f s (COSOD_REDIS_OUTAGE_WAIT): giving up", waited)
                    raise
                time.sleep(min(self._cap, self._base * 2 ** min(failures - 1, 16)))
                continue
            self.state.succeeded()
            return result


def patient_connection(url: str, wait: float) -> Any:
    """A Redis client for a worker: every command waits out an outage of up to ``wait`` seconds."""
    import redis

    return redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        # above RQ's blocking dequeue (worker TTL 420 s - 15 s): RQ raises the pool's timeout to 415 s only
        # when the worker is built, after the GPU claim may have opened a connection with this one
        socket_timeout=430,
        socket_keepalive=True,
        health_check_interval=10,
        retry=OutageRetry(wait),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
