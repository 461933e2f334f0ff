"""What the backend answers to Label Studio's "Start Training" (``START_TRAINING`` on ``/webhook``): the
fine-tune's job id and state, or why no job was started. Through the Flask app, on the in-process queue
(one per test process, so every test here uses its own project ids)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from test_backend_learning import annotation_event, fake_pipeline, set_up

from backend.api.app import create_app
from backend.jobs import queue as jobqueue
from backend.settings import Settings

_release = threading.Event()


def blocker() -> str:
    """A job that holds the in-process queue's one thread until the test releases it."""
    _release.wait(60)
    return "released"


@pytest.fixture
def client(tmp_path):
    def make(**kw: Any):
        settings = Settings(model_dir=str(tmp_path), train_every=1000, **kw)
        return create_app(settings, pipeline_factory=fake_pipeline).test_client()

    return make


def train(client, pid: int) -> dict[str, Any]:
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": pid, "title": "t"}})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def correct(client, pid: int, n: int, start: int = 0) -> None:
    rng = np.random.default_rng(pid + start)
    for k in range(start, start + n):
        r = client.post("/webhook", json=annotation_event(pid, 10 * pid + k, 100 * pid + k, rng))
        assert r.status_code == 200 and r.get_json()["stored"] == "inserted", r.get_json()


def test_start_training_without_enough_corrections_says_so_and_starts_nothing(client) -> None:
    c = client()
    set_up(c, 4201)
    correct(c, 4201, 1)
    out = train(c, 4201)
    assert out["status"] == "ok" and out["stored"] == "training_requested"
    assert out["message"] == (
        "no fine-tune started: not enough corrections yet: 1 of 3 (COSOD_FINETUNE_MIN_CORRECTIONS); "
        "training starts once there are enough"
    )
    assert "job" not in out and "finetune_job" not in out
    assert c.get("/jobs?project=4201").get_json()["jobs"] == []
    # the request stands: the correction that brings the count to 3 enqueues the fine-tune
    _release.clear()
    q = jobqueue.get_queue(Settings(model_dir="unused"))
    q.enqueue(blocker, job_id="feedback-blocker-4201", timeout=60, result_ttl=60, failure_ttl=60)
    try:
        correct(c, 4201, 1, start=1)
        assert c.get("/jobs?project=4201").get_json()["jobs"] == []  # 2 of 3
        rng = np.random.default_rng(7)
        r = c.post("/webhook", json=annotation_event(4201, 99, 4299, rng)).get_json()
        assert r["job"] == r["finetune_job"] == "finetune-p4201" and r["finetune_state"] == "queued", r
    finally:
        c.delete("/jobs/finetune-p4201")
        _release.set()


def test_start_training_answers_the_job_id_and_state_then_that_one_is_already_queued(client) -> None:
    c = client(finetune_min_corrections=2)
    set_up(c, 4202)
    correct(c, 4202, 2)
    _release.clear()
    q = jobqueue.get_queue(Settings(model_dir="unused"))
    q.enqueue(blocker, job_id="feedback-blocker-4202", timeout=60, result_ttl=60, failure_ttl=60)
    try:
        first = train(c, 4202)
        # "job" is the key Label Studio 1.23.2 reads (it records it as the ML backend's train job)
        assert first["job"] == first["finetune_job"] == "finetune-p4202"
        assert first["finetune_state"] == "queued" and first["finetune_new"] is True
        assert first["message"] == (
            "fine-tune finetune-p4202 queued; follow it: GET /jobs/finetune-p4202 or "
            "`cosod-backend jobs --project 4202`"
        )
        again = train(c, 4202)
        assert again["job"] == "finetune-p4202" and again["finetune_new"] is False
        assert again["message"].startswith("a fine-tune is already queued: finetune-p4202; follow it")
        # cancel says what it did
        gone = c.delete("/jobs/finetune-p4202").get_json()
        assert gone["was"] == "queued" and gone["outcome"] == "canceled" and gone["status"] == "canceled"
        again = c.delete("/jobs/finetune-p4202").get_json()
        assert again["was"] == "canceled" and again["outcome"] == "nothing to cancel"
    finally:
        _release.set()
    assert q.wait_idle(30)  # type: ignore[attr-defined]
    done = c.delete("/jobs/feedback-blocker-4202").get_json()
    assert done["was"] == "finished" and done["outcome"] == "nothing to cancel"


def test_a_running_job_is_asked_to_stop(client) -> None:
    c = client()
    _release.clear()
    q = jobqueue.get_queue(Settings(model_dir="unused"))
    q.enqueue(blocker, job_id="feedback-blocker-run", timeout=60, result_ttl=60, failure_ttl=60)
    try:
        for _ in range(200):
            if q.fetch("feedback-blocker-run").status == "started":
                break
            threading.Event().wait(0.02)
        out = c.delete("/jobs/feedback-blocker-run").get_json()
        assert out["was"] == "started" and out["outcome"] == "stopping", out
    finally:
        _release.set()


def test_an_annotation_below_the_threshold_says_how_many_changes_are_pending(client) -> None:
    c = client()
    set_up(c, 4203)
    rng = np.random.default_rng(0)
    out = c.post("/webhook", json=annotation_event(4203, 1, 1, rng)).get_json()
    assert out["message"] == "no fine-tune started: 1 of 1000 changes pending" and "job" not in out
