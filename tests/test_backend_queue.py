"""The in-process queue (no Redis): the embedded default that runs the same job functions in a thread."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from backend.jobs import queue as jobqueue
from backend.jobs.local import InProcessQueue
from backend.jobs.queue import get_queue
from backend.settings import Settings

TTL = {"timeout": 60, "result_ttl": 60, "failure_ttl": 60}
CALLS: dict[str, int] = {}
GATE = threading.Event()


def count_to(n: int, key: str) -> int:
    CALLS[key] = CALLS.get(key, 0) + 1
    for i in range(n + 1):
        jobqueue.report_progress(i, n, step=i)
    return n


def flaky(key: str, failures: int) -> str:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] <= failures:
        raise ConnectionError(f"attempt {CALLS[key]} failed")
    return "ok"


def hopeless(key: str) -> None:
    CALLS[key] = CALLS.get(key, 0) + 1
    jobqueue.give_up("the project has no brush control")
    raise RuntimeError("permanent")


def wait_gate(key: str) -> str:
    CALLS[key] = CALLS.get(key, 0) + 1
    while not GATE.wait(0.01):
        jobqueue.report_progress(0, 1)
    return "released"


def until_canceled(key: str) -> None:
    CALLS[key] = CALLS.get(key, 0) + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        jobqueue.report_progress(0, 1)
        time.sleep(0.01)


@pytest.fixture
def q() -> InProcessQueue:
    CALLS.clear()
    GATE.clear()
    return InProcessQueue()


def wait_status(q: InProcessQueue, job_id: str, status: str, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = q.fetch(job_id)
        if info is not None and info.status == status:
            return info
        time.sleep(0.01)
    raise AssertionError(f"{job_id} did not reach {status!r}: {q.fetch(job_id)}")


def test_runs_the_job_with_progress_and_result(q: InProcessQueue) -> None:
    e = q.enqueue(count_to, 5, "a", job_id="count-a", meta={"project": 3}, description="count", **TTL)
    assert e == ("count-a", True)
    info = wait_status(q, "count-a", "finished")
    assert info.result == 5 and info.progress == {"done": 5, "total": 5} and info.error is None
    assert info.project == 3 and info.meta["step"] == 5 and info.func.endswith("count_to")
    assert info.enqueued_at and info.started_at and info.ended_at and info.description == "count"
    assert [j.id for j in q.list(project=3)] == ["count-a"] and q.list(project=4) == []


def test_same_id_is_not_enqueued_twice(q: InProcessQueue) -> None:
    q.enqueue(wait_gate, "g", job_id="gate", **TTL)
    assert q.enqueue(count_to, 1, "b", job_id="dup", **TTL).created
    assert not q.enqueue(count_to, 1, "b", job_id="dup", **TTL).created  # queued
    GATE.set()
    wait_status(q, "dup", "finished")
    assert not q.enqueue(count_to, 1, "b", job_id="dup", **TTL).created  # finished
    assert q.wait_idle(5) and CALLS["b"] == 1
    # keep_finished=False (e.g. one fine-tune at a time): a finished job may run again
    assert q.enqueue(count_to, 1, "b", job_id="dup", keep_finished=False, **TTL).created
    wait_status(q, "dup", "finished")
    assert q.wait_idle(5) and CALLS["b"] == 2


def test_transient_failures_are_retried(q: InProcessQueue) -> None:
    q.enqueue(flaky, "f", 2, job_id="flaky", retries=2, **TTL)
    info = wait_status(q, "flaky", "finished")
    assert info.result == "ok" and CALLS["f"] == 3 and info.meta["attempt"] == 3 and info.retries_left == 0


def test_retries_run_out_with_the_last_reason(q: InProcessQueue) -> None:
    q.enqueue(flaky, "f", 5, job_id="flaky", retries=1, **TTL)
    info = wait_status(q, "flaky", "failed")
    assert CALLS["f"] == 2 and info.error == "ConnectionError: attempt 2 failed"
    # a failed job is replaced by a new request
    assert q.enqueue(flaky, "f", 0, job_id="flaky", **TTL).created
    assert wait_status(q, "flaky", "finished").result == "ok"


def test_give_up_fails_at_once_with_the_reason(q: InProcessQueue) -> None:
    q.enqueue(hopeless, "h", job_id="hopeless", retries=3, **TTL)
    info = wait_status(q, "hopeless", "failed")
    assert CALLS["h"] == 1 and info.error == "the project has no brush control"


def test_cancel_queued_and_running_jobs(q: InProcessQueue) -> None:
    q.enqueue(until_canceled, "r", job_id="running", retries=2, **TTL)
    q.enqueue(count_to, 1, "c", job_id="queued", **TTL)
    wait_status(q, "running", "started")
    assert q.cancel("queued").status == "canceled"
    assert q.cancel("running") is not None
    info = wait_status(q, "running", "canceled")
    assert info.error == "canceled by request" and CALLS["r"] == 1  # not retried
    assert q.wait_idle(5) and "c" not in CALLS
    assert q.cancel("nope") is None and q.fetch("nope") is None


def test_timeout_is_enforced_at_progress_reports(q: InProcessQueue) -> None:
    q.enqueue(until_canceled, "t", job_id="slow", timeout=1, result_ttl=60, failure_ttl=60, retries=2)
    info = wait_status(q, "slow", "failed", timeout=5)
    assert "timeout of 1 s" in (info.error or "") and CALLS["t"] == 1


def test_records_expire_after_their_ttl(q: InProcessQueue) -> None:
    q.enqueue(count_to, 1, "e", job_id="short", timeout=60, result_ttl=1, failure_ttl=60)
    wait_status(q, "short", "finished")
    time.sleep(1.1)
    assert q.fetch("short") is None and q.list() == []


def test_bad_arguments_are_refused_with_the_value(q: InProcessQueue) -> None:
    with pytest.raises(ValueError, match="'a b'"):
        q.enqueue(count_to, 1, "x", job_id="a b", **TTL)
    with pytest.raises(ValueError, match="timeout .* got 0"):
        q.enqueue(count_to, 1, "x", job_id="ok", timeout=0, result_ttl=1, failure_ttl=1)
    with pytest.raises(ValueError, match="done=3 total=2"):
        jobqueue.report_progress(3, 2)
    jobqueue.report_progress(1, 2)  # outside a job: a no-op


def test_get_queue_picks_the_implementation_from_the_settings() -> None:
    s = Settings()
    assert get_queue(s) is get_queue(s) and get_queue(s).kind == "inprocess"
    assert get_queue(s.with_(redis_url="redis://127.0.0.1:6379/13")).kind == "rq"
    with pytest.raises(ValueError, match="REDIS_URL"):
        Settings(redis_url="127.0.0.1:6379")


def test_claim_next_is_the_first_queued_job_of_the_function(q: InProcessQueue) -> None:
    q.enqueue(wait_gate, "gate", job_id="running", **TTL)
    wait_status(q, "running", "started")
    assert q.claim_next(count_to, ttl=60) is None
    q.enqueue(flaky, "f", 0, job_id="flaky", **TTL)
    q.enqueue(count_to, 2, "a", job_id="count-a", **TTL)
    q.enqueue(count_to, 3, "b", job_id="count-b", **TTL)
    q.cancel("count-a")
    assert q.claim_next(count_to, ttl=60) == ("count-b", (3, "b"))
    GATE.set()
    assert q.wait_idle(5) and q.claim_next(count_to, ttl=60) is None
