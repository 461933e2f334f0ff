"""Faults against real processes: a private ``redis-server`` (its own port and folder; SIGKILLed and
restarted, with and without AOF) and real ``cosod-worker`` subprocesses (tiny backbone, 1 s heartbeat).

What each asserts: the job that was running when Redis died ends once (finished, its side effect done
once), the worker is still alive and serves the next job without anyone restarting it, ``/health``'s
worker count (the liveness keys) follows the live workers, a worker exits 1 only when Redis stays away
longer than ``COSOD_REDIS_OUTAGE_WAIT``, and deaths of a job's workers do not use its retries.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer, cosod_worker, stall_first_run

from backend.jobs.rqueue import RQQueue, count_alive

pytestmark = pytest.mark.slow

QUEUE = "cosod-faults"
TTL = {"timeout": 120, "result_ttl": 600, "failure_ttl": 600}


def marked(marker: str, seconds: float) -> int:
    """A job whose side effect lives outside Redis: each run appends a line to ``marker`` (a file), then
    reports progress for ``seconds`` on its first run only. Returns the number of runs."""
    with open(marker, "a") as fh:
        fh.write("run\n")
    return stall_first_run(len(Path(marker).read_text().splitlines()), seconds)


def wait_until(what: str, check: Any, timeout: float, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # Redis still restarting
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def finished(q: RQQueue, job_id: str, timeout: float = 60) -> Any:
    """The job's info once it finished."""
    return wait_until(
        f"{job_id} finishes", lambda: (i := q.fetch(job_id)) and i.status == "finished" and i, timeout
    )


def runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


@pytest.fixture(params=[True, False], ids=["aof", "no-persistence"])
def server(request: Any, tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path / "redis", aof=request.param).start()
    try:
        yield srv
    finally:
        srv.stop()


def progressing(q: RQQueue, job_id: str) -> Any:
    info = q.fetch(job_id)
    return info if info is not None and (info.progress or {}).get("done", 0) >= 1 else None


def test_redis_killed_during_a_job(server: RedisServer, tmp_path: Path) -> None:
    """Redis SIGKILLed while a job reports progress, back 3 s later: the job finishes once, the worker
    lives on and runs the next job; with AOF the record is Redis's own, without it the worker writes the
    finished job back."""
    q = RQQueue(server.url, QUEUE)
    marker = tmp_path / "marker"
    q.enqueue(marked, str(marker), 8.0, job_id="long", retries=2, **TTL)
    with cosod_worker(tmp_path, "w1", server.url, QUEUE) as proc:
        wait_until("the job reports progress", lambda: progressing(q, "long"), 60)
        server.kill()
        time.sleep(3.0)
        server.start()
        t_back = time.monotonic()
        info = finished(q, "long")
        recovered = time.monotonic() - t_back
        assert info.result == 1 and runs(marker) == 1, "the job ran once"
        assert info.progress == {"done": 2, "total": 2}
        assert proc.poll() is None, "the worker is alive"
        wait_until("the worker is counted again", lambda: count_alive(q.connection, QUEUE) == 1, 5)
        from rq import Worker

        wait_until("rq lists the worker again", lambda: len(Worker.all(connection=q.connection)) == 1, 5)
        # and it serves the next job
        q.enqueue(marked, str(tmp_path / "next"), 0.0, job_id="next", **TTL)
        assert finished(q, "next", 30)
    assert proc.returncode == 0, "a stop request ends the worker with 0"
    print(f"\n[{'aof' if server.aof else 'none'}] finished {recovered:.2f} s after Redis came back")


def test_a_worker_exits_1_when_redis_stays_away(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", aof=False).start()
    q = RQQueue(server.url, QUEUE)
    q.enqueue(marked, str(tmp_path / "marker"), 30.0, job_id="long", **TTL)
    try:
        with cosod_worker(tmp_path, "w1", server.url, QUEUE, COSOD_REDIS_OUTAGE_WAIT="3") as proc:
            wait_until("the job reports progress", lambda: progressing(q, "long"), 60)
            server.kill()
            t0 = time.monotonic()
            assert proc.wait(60) == 1
            waited = time.monotonic() - t0
    finally:
        server.stop()
    assert 3.0 <= waited < 30.0
    assert "giving up" in (tmp_path / "w1.log").read_text()


def test_health_counts_live_workers_only(tmp_path: Path) -> None:
    """The liveness keys: a SIGKILLed worker drops out within its TTL (2 x 1 s + 1 s), and after Redis
    restarted empty every live worker is counted again within a heartbeat."""
    server = RedisServer(tmp_path / "redis", aof=False).start()
    q = RQQueue(server.url, QUEUE)
    try:
        with (
            cosod_worker(tmp_path, "a", server.url, QUEUE) as a,
            cosod_worker(tmp_path, "b", server.url, QUEUE),
        ):
            wait_until("two workers", lambda: count_alive(q.connection, QUEUE) == 2, 60)
            os.kill(a.pid, signal.SIGKILL)
            a.wait(10)
            t0 = time.monotonic()
            wait_until("one worker", lambda: count_alive(q.connection, QUEUE) == 1, 10)
            assert time.monotonic() - t0 <= 3.5
            server.kill()
            server.start()
            wait_until("the live one again", lambda: count_alive(q.connection, QUEUE) == 1, 10)
            assert count_alive(q.connection, "other-queue") == 0
    finally:
        server.stop()


def test_deaths_do_not_use_up_retries(tmp_path: Path) -> None:
    """A job whose worker is SIGKILLed three times (retries=2) still finishes on the fourth run: deaths are
    counted apart and give their retry back."""
    server = RedisServer(tmp_path / "redis", aof=False).start()
    q = RQQueue(server.url, QUEUE)
    marker = tmp_path / "marker"
    try:
        q.enqueue(marked, str(marker), 600.0, job_id="unlucky", retries=2, **TTL)
        for n in range(3):  # ``marked`` stalls on a run that finds the marker empty
            with cosod_worker(tmp_path, f"doomed{n}", server.url, QUEUE) as proc:
                wait_until(f"run {n + 1} starts", lambda: runs(marker) == 1, 60)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            if n < 2:
                marker.write_text("")
        with cosod_worker(tmp_path, "rescuer", server.url, QUEUE):
            info = finished(q, "unlucky")
    finally:
        server.stop()
    assert info.meta["deaths"] == 3 and info.meta["attempt"] == 4 and info.retries_left == 2
    assert "last_error" not in info.meta


def test_a_death_reaped_by_someone_else_is_still_counted(tmp_path: Path) -> None:
    """rq-dashboard's pages run RQ's own registry clean-up, which re-queues a dead worker's job using a
    retry. The next run's start sees the previous run never ended, counts the death and gives it back."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    server = RedisServer(tmp_path / "redis", aof=False).start()
    q = RQQueue(server.url, QUEUE)
    marker = tmp_path / "marker"
    try:
        q.enqueue(marked, str(marker), 600.0, job_id="reaped", retries=1, **TTL)
        with cosod_worker(tmp_path, "doomed", server.url, QUEUE) as proc:
            wait_until("the run starts", lambda: runs(marker) == 1, 60)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        registry = StartedJobRegistry(queue=Queue(QUEUE, connection=q.connection))
        wait_until(
            "RQ's own clean-up re-queues it",
            lambda: registry.cleanup() or q.fetch("reaped").status == "queued",
            10,
        )
        assert q.fetch("reaped").retries_left == 0  # RQ used the retry
        with cosod_worker(tmp_path, "rescuer", server.url, QUEUE):
            info = finished(q, "reaped")
    finally:
        server.stop()
    assert info.meta["deaths"] == 1 and info.meta["attempt"] == 2 and info.retries_left == 1
    assert "running" not in info.meta and "last_error" not in info.meta
