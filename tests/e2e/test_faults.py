"""Faults during batch pre-annotation: a worker killed mid-group, Label Studio stopped mid-job, Redis
SIGKILLed during a group (with and without AOF) and restarted between jobs. Real processes throughout
(Label Studio, gunicorn, cosod-worker, redis-server)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from redis_server import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FINAL = ("finished", "failed", "canceled")


def job(url: str, job_id: str) -> dict[str, Any]:
    return requests.get(f"{url}/jobs/{job_id}", timeout=30).json()


def wait_until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def prelabel(url: str, project: int, **extra: Any) -> dict[str, Any]:
    r = requests.post(f"{url}/jobs/prelabel", json={"project": project, **extra}, timeout=60)
    assert r.status_code == 202, r.text
    return r.json()


def counts(e2e: Any, ls: Any, project: int) -> dict[int, int]:
    return {t: len(p) for t, p in e2e.predictions_by_task(ls, project).items()}


def test_a_worker_killed_mid_group_is_replaced_without_duplicates(
    label_studio: Any, redis_db: str, tmp_path: Path, start_backend: Any, start_worker: Any, e2e: Any
) -> None:
    ls = label_studio
    # chunks of 2 images (+2 references) so that a group of 6 reports progress between chunks
    env = {
        "REDIS_URL": redis_db,
        "COSOD_QUEUE": "cosod-faults-kill",
        "MODEL_DIR": str(tmp_path / "model"),
        "COSOD_MAX_GROUP_IMAGES": "4",
        "COSOD_MAX_REFS": "2",
    }
    wenv = {**env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": e2e.TOKEN}
    project, task_group = e2e.create_grouped_project(ls, {"only": 6}, title="killed worker")
    with (
        start_backend(ls.url, e2e.TOKEN, tmp_path / "api", **env) as api,
        start_worker(tmp_path, wenv, slow_s=2.0, name="victim") as victim,
    ):
        (job_id,) = prelabel(api.url, project)["jobs"]
        wait_until(
            lambda: (job(api.url, job_id).get("progress") or {}).get("done", 0) > 0, 120, "progress > 0"
        )
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert job(api.url, job_id)["status"] == "started"  # nobody has noticed yet
        with start_worker(tmp_path, wenv, name="rescuer"):
            info = wait_until(lambda: (j := job(api.url, job_id))["status"] in FINAL and j, 120, "the re-run")
    assert info["status"] == "finished", info
    # the death is counted apart and did not use a retry (COSOD_JOB_RETRIES counts failing runs only)
    assert info["progress"] == {"done": 6, "total": 6} and info["retries_left"] == 2
    assert info["meta"]["deaths"] == 1 and info["meta"]["attempt"] == 2
    result = info["result"]
    assert result["skipped"] >= 1 and result["pushed"] + result["skipped"] == 6, result
    assert counts(e2e, ls, project) == {t: 1 for t in task_group}


def test_label_studio_stopped_mid_job_fails_cleanly_and_keeps_finished_groups(
    redis_db: str, tmp_path: Path, start_label_studio: Any, start_backend: Any, start_worker: Any, e2e: Any
) -> None:
    env = {
        "REDIS_URL": redis_db,
        "COSOD_QUEUE": "cosod-faults-ls",
        "MODEL_DIR": str(tmp_path / "model"),
        "COSOD_JOB_RETRIES": "1",
        "COSOD_JOB_ATTEMPTS": "2",
        "COSOD_JOB_BACKOFF": "0.2",
    }
    with start_label_studio(tmp_path / "ls") as ls:
        project, task_group = e2e.create_grouped_project(ls, {"a": 2, "b": 2, "c": 2}, title="ls stops")
        wenv = {**env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": e2e.TOKEN}
        with (
            start_backend(ls.url, e2e.TOKEN, tmp_path / "api", **env) as api,
            start_worker(tmp_path, wenv, slow_s=1.5, name="w"),
        ):
            ids = prelabel(api.url, project)["jobs"]
            assert len(ids) == 3

            def one_done_one_running() -> bool:
                states = [job(api.url, i)["status"] for i in ids]
                return states.count("finished") >= 1 and "started" in states

            wait_until(one_done_one_running, 120, "one group finished and the next one running")
            e2e.stop(ls.proc)  # Label Studio goes away in the middle of a group
            final = wait_until(
                lambda: (
                    (js := [job(api.url, i) for i in ids]) and all(j["status"] in FINAL for j in js) and js
                ),
                120,
                "every job to end",
            )
    finished = [j for j in final if j["status"] == "finished"]
    failed = [j for j in final if j["status"] == "failed"]
    assert finished and failed and len(finished) + len(failed) == 3, final
    for j in failed:
        assert "Label Studio" in j["error"] and "unreachable" in j["error"], j["error"]
        assert "gave up after 2 attempts" in j["error"] and j["retries_left"] == 0, j
    # Label Studio back on the same data: the finished groups' predictions are there, none twice
    with start_label_studio(tmp_path / "ls") as ls:
        got = counts(e2e, ls, project)
    done_groups = {j["result"]["group"].split("=", 1)[1] for j in finished}
    assert all(n == 1 for n in got.values()), got
    assert {t for t, g in task_group.items() if g in done_groups} <= set(got), (done_groups, got)


def test_api_and_workers_reconnect_after_a_redis_restart(
    label_studio: Any, tmp_path: Path, start_backend: Any, start_worker: Any, e2e: Any
) -> None:
    ls, port = label_studio, e2e.free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {"REDIS_URL": url, "MODEL_DIR": str(tmp_path / "model")}
    wenv = {**env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": e2e.TOKEN}
    first, first_tasks = e2e.create_grouped_project(ls, {"x": 2, "y": 2}, title="before restart")
    second, second_tasks = e2e.create_grouped_project(ls, {"z": 3}, title="after restart")

    def run_all(api: Any, project: int) -> list[dict[str, Any]]:
        ids = prelabel(api.url, project)["jobs"]
        return wait_until(
            lambda: (js := [job(api.url, i) for i in ids]) and all(j["status"] in FINAL for j in js) and js,
            120,
            f"the jobs of project {project}",
        )

    server = RedisServer(tmp_path / "redis", aof=False, port=port).start()
    try:
        with start_backend(ls.url, e2e.TOKEN, tmp_path / "api", **env) as api, start_worker(tmp_path, wenv):
            assert all(j["status"] == "finished" for j in run_all(api, first))
            server.kill()
            health = requests.get(f"{api.url}/health", timeout=30)
            assert health.status_code == 503 and "unreachable" in health.json()["redis"]
            server.start()
            wait_until(lambda: requests.get(f"{api.url}/health", timeout=10).status_code == 200, 30, "health")
            # Redis lost every job record: asking again re-runs the groups, which push nothing new
            again = run_all(api, first)
            assert [j["result"]["pushed"] for j in again] == [0, 0], again
            after = run_all(api, second)
            assert after[0]["status"] == "finished" and after[0]["result"]["pushed"] == 3, after
    finally:
        server.stop()
    assert counts(e2e, ls, first) == {t: 1 for t in first_tasks}
    assert counts(e2e, ls, second) == {t: 1 for t in second_tasks}


@pytest.mark.parametrize("aof", [True, False], ids=["aof", "no-persistence"])
def test_redis_killed_during_a_group(
    aof: bool, label_studio: Any, tmp_path: Path, start_backend: Any, start_worker: Any, e2e: Any
) -> None:
    """Redis SIGKILLed while a group computes, back 3 s later. The worker waits, goes on and ends the group
    once; nobody restarts anything. With AOF every job survives; without persistence the queued group's job
    is gone, ``GET /jobs/coverage`` names that group, and asking again completes it. Either way: one
    prediction per task, the worker alive and counted by /health."""
    ls = label_studio
    server = RedisServer(tmp_path / "redis", aof=aof).start()
    env = {
        "REDIS_URL": server.url,
        "MODEL_DIR": str(tmp_path / "model"),
        "COSOD_MAX_GROUP_IMAGES": "4",
        "COSOD_MAX_REFS": "2",
    }
    wenv = {**env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": e2e.TOKEN}
    project, task_group = e2e.create_grouped_project(ls, {"first": 6, "second": 2}, title=f"redis dies {aof}")
    try:
        with (
            start_backend(ls.url, e2e.TOKEN, tmp_path / "api", **env) as api,
            start_worker(tmp_path, wenv, slow_s=1.5, name="w") as worker,
        ):
            ids = prelabel(api.url, project)["jobs"]
            running = wait_until(
                lambda: next(
                    (i for i in ids if (job(api.url, i).get("progress") or {}).get("done", 0) > 0), None
                ),
                120,
                "a group in progress",
            )
            server.kill()
            time.sleep(3.0)
            server.start()
            t_back = time.monotonic()
            info = wait_until(
                lambda: (j := job(api.url, running)).get("status") == "finished" and j, 120, "the group"
            )
            recovered = time.monotonic() - t_back
            assert worker.poll() is None, "the worker is alive"
            assert info["meta"]["attempt"] == 1 and not info["meta"].get("deaths"), info["meta"]
            if not aof:  # the queued group's job died with Redis: coverage says so, asking again redoes it
                cov = requests.get(f"{api.url}/jobs/coverage", params={"project": project}, timeout=60).json()
                assert cov["missing"] >= 1 and any(g["job_status"] == "missing" for g in cov["groups"]), cov
                ids = prelabel(api.url, project)["jobs"]
            final = wait_until(
                lambda: (
                    (js := [job(api.url, i) for i in ids]) and all(j["status"] in FINAL for j in js) and js
                ),
                120,
                "every group",
            )
            assert all(j["status"] == "finished" for j in final), final
            health = wait_until(
                lambda: (h := requests.get(f"{api.url}/health", timeout=10).json()).get("workers") == 1 and h,
                10,
                "/health counting the worker",
            )
            assert health["batch_ready"] is True
            cov = requests.get(f"{api.url}/jobs/coverage", params={"project": project}, timeout=60).json()
            assert cov["missing"] == 0, cov
    finally:
        server.stop()
    assert counts(e2e, ls, project) == {t: 1 for t in task_group}
    print(f"\n[{'aof' if aof else 'none'}] the group finished {recovered:.2f} s after Redis came back")
