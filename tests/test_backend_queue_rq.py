"""The RQ queue against the real Redis on 127.0.0.1 (database 13, flushed) and real ``cosod-worker``
subprocesses (tiny backbone): progress, dedup, retries, give-up, cancel, and a worker killed mid-job."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import cosod_worker, stall_first_run

from backend.errors import QueueUnavailableError
from backend.jobs import queue as jobqueue
from backend.jobs.rqueue import RQQueue

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
URL = "redis://127.0.0.1:6379/13"
QUEUE = "cosod-test"
TTL = {"timeout": 60, "result_ttl": 300, "failure_ttl": 300}


def _redis() -> Any:
    import redis

    return redis.Redis.from_url(URL)


def count_to(n: int) -> int:
    for i in range(n + 1):
        jobqueue.report_progress(i, n)
    return n


def flaky(key: str, failures: int) -> str:
    if _redis().incr(key) <= failures:
        raise ConnectionError("Label Studio is away")
    return "ok"


def hopeless(key: str) -> None:
    _redis().incr(key)
    jobqueue.give_up("no brush control in the label config")
    raise RuntimeError("permanent")


def sleepy(key: str, seconds: float) -> int:
    """The first run stalls (so it can be killed); later runs finish at once. Returns the run count."""
    return stall_first_run(int(_redis().incr(key)), seconds)


@pytest.fixture
def q() -> Iterator[RQQueue]:
    try:
        _redis().ping()
    except Exception as exc:
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({exc})")
    _redis().flushdb()
    yield RQQueue(URL, QUEUE)
    _redis().flushdb()


def worker(tmp_path: Path, name: str) -> Any:
    return cosod_worker(tmp_path, name, URL, QUEUE)


def wait_for(q: RQQueue, job_id: str, statuses: tuple[str, ...], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = q.fetch(job_id)
        if info is not None and info.status in statuses:
            return info
        time.sleep(0.05)
    raise AssertionError(f"{job_id} did not reach {statuses}: {q.fetch(job_id)}")


def kill_its_worker_mid_job(q: RQQueue, tmp_path: Path, job_id: str) -> None:
    """Start a worker, wait until it reports progress on ``job_id`` (a ``sleepy`` job), then SIGKILL it."""
    with worker(tmp_path, "doomed") as first:
        info = wait_for(q, job_id, ("started",))
        while (info.progress or {}).get("done", 0) < 1:
            info = wait_for(q, job_id, ("started",))
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)


def test_jobs_run_on_a_worker_with_progress_and_dedup(q: RQQueue, tmp_path: Path) -> None:
    assert q.enqueue(count_to, 4, job_id="count-1", meta={"project": 7}, description="count", **TTL).created
    assert q.fetch("count-1").status == "queued"
    with worker(tmp_path, "w1"):
        info = wait_for(q, "count-1", ("finished",))
    assert info.result == 4 and info.progress == {"done": 4, "total": 4} and info.project == 7
    assert info.enqueued_at and info.started_at and info.ended_at and info.error is None
    assert not q.enqueue(count_to, 4, job_id="count-1", **TTL).created  # finished: not again
    assert [j.id for j in q.list(project=7)] == ["count-1"] and q.list(project=8) == []
    assert q.fetch("nope") is None and q.cancel("nope") is None


def test_retries_then_give_up_and_cancel(q: RQQueue, tmp_path: Path) -> None:
    q.enqueue(flaky, "flaky", 1, job_id="flaky", retries=2, **TTL)
    q.enqueue(flaky, "doomed", 9, job_id="doomed", retries=1, **TTL)
    q.enqueue(hopeless, "hopeless", job_id="hopeless", retries=3, **TTL)
    q.enqueue(count_to, 1, job_id="dropped", **TTL)
    assert q.cancel("dropped").status == "canceled"
    with worker(tmp_path, "w1"):
        ok = wait_for(q, "flaky", ("finished",))
        doomed = wait_for(q, "doomed", ("failed",))
        hopeless_info = wait_for(q, "hopeless", ("failed",))
    assert ok.result == "ok" and int(_redis().get("flaky")) == 2
    assert ok.meta["attempt"] == 2 and "last_error" not in ok.meta  # the run that failed is not the outcome
    assert int(_redis().get("doomed")) == 2 and "ConnectionError: Label Studio is away" in doomed.error
    assert int(_redis().get("hopeless")) == 1
    assert hopeless_info.error == "no brush control in the label config"
    assert q.fetch("dropped").status == "canceled"
    assert q.enqueue(count_to, 1, job_id="dropped", **TTL).created  # a canceled id may be asked again


def test_cancel_a_running_job(q: RQQueue, tmp_path: Path) -> None:
    q.enqueue(sleepy, "runs", 30.0, job_id="long", retries=2, **TTL)
    with worker(tmp_path, "w1"):
        wait_for(q, "long", ("started",))
        q.cancel("long")
        info = wait_for(q, "long", ("canceled",), timeout=20)
    assert info.error == "canceled by request" and int(_redis().get("runs")) == 1


def test_a_killed_workers_job_is_run_again_by_another(q: RQQueue, tmp_path: Path) -> None:
    q.enqueue(sleepy, "runs", 120.0, job_id="stall", retries=2, **TTL)
    kill_its_worker_mid_job(q, tmp_path, "stall")
    t0 = time.monotonic()
    with worker(tmp_path, "rescuer"):
        info = wait_for(q, "stall", ("finished",), timeout=60)
    assert info.result == 2 and info.progress == {"done": 2, "total": 2}
    # the death is counted, and did not use a retry; the meta tells the second run apart from the first
    assert info.retries_left == 2 and info.meta["deaths"] == 1 and info.meta["attempt"] == 2
    assert "last_error" not in info.meta and info.error is None
    assert time.monotonic() - t0 < 45


def test_a_killed_job_without_retries_can_be_asked_again_at_once(q: RQQueue, tmp_path: Path) -> None:
    """rq 3 still lists a killed worker's execution for 60 s after the execution's record expired, and its
    ``Job.delete`` then raised ``ValueError: Execution ... not found in Redis``: asking again for the failed
    job answered 400 for a minute. The first assertions check that this layout is still rq's. (A death is
    re-run without using a retry up to MAX_DEATHS times; this job has used them all, so it fails.)"""
    from rq.executions import Execution, ExecutionRegistry

    from backend.jobs.rqueue import MAX_DEATHS

    q.enqueue(sleepy, "runs", 120.0, job_id="once", meta={"deaths": MAX_DEATHS}, **TTL)
    kill_its_worker_mid_job(q, tmp_path, "once")
    with worker(tmp_path, "reaper"):
        assert wait_for(q, "once", ("failed",), timeout=30).retries_left in (None, 0)
        listed = ExecutionRegistry(job_id="once", connection=q.connection).get_execution_ids()
        assert len(listed) == 1
        assert not q.connection.exists(Execution(id=listed[0], job_id="once", connection=q.connection).key)
        assert q.enqueue(count_to, 3, job_id="once", **TTL).created
        assert wait_for(q, "once", ("finished",)).result == 3
    assert int(_redis().get("runs")) == 1


def test_the_outcome_is_recorded_after_the_run_ended(q: RQQueue, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever sees a job finished or failed sees its run ended: no ``running`` mark, and a finished job no
    earlier run's error. The meta stored in Redis is read at the moment RQ records each outcome; a job
    re-queued by someone who did not count its worker's death (``running`` still set) is among them."""
    from rq.job import Job

    from backend.jobs.worker import worker_class

    seen: dict[str, dict[str, Any]] = {}
    for name in ("_handle_success", "_handle_failure"):
        original = getattr(Job, name)

        def record(job: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen[job.id] = Job.fetch(job.id, connection=job.connection).get_meta()
            return _original(job, *args, **kwargs)

        monkeypatch.setattr(Job, name, record)
    q.enqueue(count_to, 2, job_id="fine", **TTL)
    q.enqueue(hopeless, "hopeless", job_id="hopeless", **TTL)
    q.enqueue(count_to, 1, job_id="requeued", **TTL)
    requeued = Job.fetch("requeued", connection=_redis())
    requeued.meta.update(running=True, runs=1, attempt=1)
    requeued.save_meta()
    worker_class(1)([QUEUE], connection=_redis()).work(burst=True)
    assert set(seen) == {"fine", "hopeless", "requeued"}
    assert not any("running" in meta for meta in seen.values()), seen
    assert seen["requeued"]["deaths"] == 1 and seen["requeued"]["attempt"] == 2
    assert "last_error" not in seen["requeued"] and "last_error" not in q.fetch("requeued").meta
    assert q.fetch("fine").status == "finished" and q.fetch("hopeless").status == "failed"


def test_the_rq_internals_the_worker_overrides_keep_their_shape() -> None:
    """``backend.jobs.worker`` reimplements ``SimpleWorker.execute_job`` with a heartbeat thread; it calls
    these rq internals by position. A new rq that renames or reorders them fails here, not in production."""
    import inspect

    from rq.worker import BaseWorker, SimpleWorker

    def params(f: Any) -> list[str]:
        return list(inspect.signature(f).parameters)[:4]

    assert params(SimpleWorker.execute_job) == ["self", "job", "queue"]
    assert params(BaseWorker.prepare_execution) == ["self", "job"]
    assert params(BaseWorker.maintain_heartbeats) == ["self", "job", "execution"]
    assert params(BaseWorker.perform_job) == ["self", "job", "queue", "execution"]
    assert params(BaseWorker.get_heartbeat_ttl)[:2] == ["self", "job"]


def test_unreachable_redis_is_named() -> None:
    dead = RQQueue("redis://127.0.0.1:1/0", QUEUE)
    with pytest.raises(QueueUnavailableError, match="127.0.0.1:1"):
        dead.fetch("x")
    with pytest.raises(QueueUnavailableError, match="unreachable"):
        dead.enqueue(count_to, 1, job_id="x", **TTL)


def test_claim_next_gives_each_queued_job_to_one_reader(q: RQQueue) -> None:
    """Two workers reading ahead never pick the same queued job; other functions and claimed jobs are
    passed over, and a claim expires with its ttl."""
    q.enqueue(flaky, "k", 0, job_id="other-func", **TTL)
    for i in range(3):
        q.enqueue(count_to, i, job_id=f"count-{i}", **TTL)
    second = RQQueue(URL, QUEUE)  # another worker's view of the same queue
    assert q.claim_next(count_to, ttl=1) == ("count-0", (0,))
    assert second.claim_next(count_to, ttl=60) == ("count-1", (1,))
    assert q.claim_next(count_to, ttl=60) == ("count-2", (2,))
    assert second.claim_next(count_to, ttl=60) is None  # all claimed; flaky is not count_to
    time.sleep(1.2)
    assert second.claim_next(count_to, ttl=60) == ("count-0", (0,))  # the first claim expired
    assert RQQueue("redis://127.0.0.1:1/0", QUEUE).claim_next(count_to, ttl=5) is None  # no Redis: no claim
