# ruff: noqa: F811  (pytest fixtures imported from test_backend_app are redefined as parameters)
"""Hostile requests against the app (test client, real Redis, the tiny pipeline): clear 4xx, never a 500,
nothing echoed at length, no secret shown, bounded labels and bounded work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from redis_db import flushed, url
from test_backend_app import BRUSH, make_client, predict, project_with_groups, setup, spy  # noqa: F401

from backend.prediction.groupcache import GroupCache, Outcome

DB = 14
POST_ROUTES = ("/setup", "/predict", "/webhook", "/jobs/prelabel")
SECRET = "s3cret-redis-pw"


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize(
    "body, needle",
    [
        (deep(10_000), b"nested too deeply"),
        (b'{"project": NaN}', b"NaN is not valid JSON"),
        (b'{"project": "\\ud800"}', b"unpaired UTF-16 surrogate"),
        (b'{"a": "\xff\xfe"}', b"not UTF-8"),
        (b"[1, 2]", b"got list"),
        (b"", b"the body is empty"),
    ],
    ids=["deep", "nan", "surrogate", "latin1", "list", "empty"],
)
def test_bodies_that_are_not_plain_json_objects_get_400(
    client, route: str, body: bytes, needle: bytes
) -> None:
    r = client.post(route, data=body, content_type="application/json")
    assert r.status_code == 400, r.data[:300]
    assert needle in r.data and len(r.data) < 600


def test_a_body_over_the_cap_gets_413_naming_the_variable(make_client) -> None:
    client = make_client(max_body_bytes=4096)
    r = client.post("/webhook", data=b'{"action": "' + b"x" * 8000 + b'"}', content_type="application/json")
    assert r.status_code == 413 and "COSOD_MAX_BODY_BYTES" in r.json["error"]


@pytest.mark.parametrize(
    "value",
    ["²", "３", "3.9", "1" * 5000, str(2**63), "12.", "-3", "12.17953403080000000000"],
)
def test_odd_project_ids_are_400_naming_the_field(client, value: str) -> None:
    r = client.post("/setup", json={"project": value, "schema": BRUSH})
    assert r.status_code == 400 and "'project'" in r.json["error"], (value, r.json)
    assert len(r.data) < 600


def test_webhook_actions_are_metric_labels_only_when_label_studio_knows_them(client) -> None:
    actions = ["\ud800", "x" * 100_000] + [f"EVIL_{i}" for i in range(300)]
    for action in actions:
        r = client.post("/webhook", data=json.dumps({"action": action}), content_type="application/json")
        assert r.status_code in (200, 400), r.json
        assert len(r.data) < 600
    client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 12}})
    client.open("/health", method="FOO")
    text = client.get("/metrics").get_data(as_text=True)
    assert r.status_code == 200 and len(text) < 64_000
    assert 'action="other"' in text and 'action="PROJECT_UPDATED"' in text
    assert "EVIL" not in text and "xxxx" not in text and 'method="FOO"' not in text


def test_job_ids_that_are_not_job_ids_are_404(make_client) -> None:
    with flushed(DB) as r:
        client = make_client(redis_url=url(DB))
        r.set("rq:job:notahash", "x")
        r.hset("rq:job:badhash", "foo", "bar")
        for jid in ("%00", "%E2%98%83", "a" * 300, "..", "notahash", "badhash", "nope"):
            for method in ("GET", "DELETE"):
                resp = client.open(f"/jobs/{jid}", method=method)
                assert resp.status_code == 404, (jid, method, resp.json)
                assert len(resp.data) < 600
        assert client.get("/jobs").status_code == 200


def test_redis_down_answers_503_without_the_password(make_client) -> None:
    client = make_client(redis_url=f"redis://:{SECRET}@127.0.0.1:1/0")
    for method, path, body in (
        ("GET", "/jobs", None),
        ("GET", "/jobs/abc", None),
        ("DELETE", "/jobs/abc", None),
        ("GET", "/health", None),
    ):
        r = client.open(path, method=method, json=body)
        assert r.status_code == 503, (path, r.json)
        assert SECRET.encode() not in r.data, r.data


def test_a_webhook_stores_the_correction_when_the_fine_tune_cannot_be_queued(make_client) -> None:
    from test_backend_learning import annotation_event  # the webhook payload of a real brush correction

    client = make_client(
        redis_url=f"redis://:{SECRET}@127.0.0.1:1/0", train_every=1, finetune_min_corrections=1
    )
    assert setup(client).status_code == 200
    event = annotation_event(project=12, task=101, annotation=1, rng=np.random.default_rng(0))
    r = client.post("/webhook", json=event)
    assert r.status_code == 200, r.json
    assert r.json["stored"] and r.json["finetune_job"] is None and "unreachable" in r.json["finetune_error"]
    assert SECRET not in r.get_data(as_text=True)


def test_ums_without_its_checkpoint_is_400_naming_the_variable(client) -> None:
    r = setup(client, extra_params={"model": "ums"})
    assert r.status_code == 400 and "COSOD_UMS_CHECKPOINT" in r.json["error"]


def test_tasks_over_the_cap_get_a_per_task_error_and_groups_compute_in_bounded_parts(
    make_client, fake_ls, spy
) -> None:
    tasks = project_with_groups(fake_ls, {"a": 30}, field="group")
    client = make_client(max_predict_tasks=20, max_group_images=8, max_refs=3)
    r = predict(client, tasks)
    assert r.status_code == 200
    items, errors = r.json["results"], r.json["errors"]
    assert len(items) == 30
    assert all("result" in i for i in items[:20]) and not any("result" in i for i in items[20:])
    assert {e["task"] for e in errors} == {t["id"] for t in tasks[20:]}
    assert all("COSOD_MAX_PREDICT_TASKS=20" in e["error"] for e in errors)
    assert spy.calls and max(spy.calls) <= 8, spy.calls


def test_a_task_of_another_project_is_not_read(client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"a": 3}, field="group")
    tasks[1] = {**tasks[1], "project": 13}
    r = predict(client, tasks)
    assert r.status_code == 200
    assert "result" not in r.json["results"][1] and "belongs to project 13" in r.json["results"][1]["error"]
    assert [e["task"] for e in r.json["errors"]] == [tasks[1]["id"]]


def test_a_task_label_studio_does_not_list_in_the_project_is_not_read(client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"a": 3}, field="group")
    stranger = {"id": 999, "data": {"image": "/data/upload/3/secret.png", "group": "a"}}
    r = predict(client, [*tasks, stranger])
    assert r.status_code == 200
    assert "not a task of project 12" in r.json["results"][3]["error"]
    assert "result" not in r.json["results"][3] and spy.calls == [3]


def test_a_huge_image_string_is_not_echoed(client, fake_ls) -> None:
    tasks = project_with_groups(fake_ls, {"a": 2}, field="group")
    tasks[0] = {**tasks[0], "data": {**tasks[0]["data"], "image": "http://x/" + "a" * 2_000_000}}
    r = predict(client, tasks)
    assert r.status_code in (200, 400, 413) and len(r.data) < 20_000, len(r.data)


def test_the_group_cache_is_bounded_in_bytes_and_round_trips_masks() -> None:
    rng = np.random.default_rng(0)
    masks = {i: rng.random((100, 120)) > 0.5 for i in range(10)}
    cache = GroupCache(size=100, max_bytes=5 * (100 * 120 // 8 + 100))
    cache.put(("v", "g1"), {i: Outcome(mask=m, score=0.5) for i, m in list(masks.items())[:5]})
    got = cache.get(("v", "g1"), range(10))
    assert sorted(got) == [0, 1, 2, 3, 4] and all(np.array_equal(got[i].mask, masks[i]) for i in got)
    cache.put(("v", "g2"), {i: Outcome(mask=m, score=0.5) for i, m in list(masks.items())[5:]})
    assert cache.get(("v", "g1"), range(10)) == {} and len(cache.get(("v", "g2"), range(10))) == 5
    assert cache.nbytes <= cache.max_bytes


@pytest.fixture
def client(make_client):
    return make_client()


def test_gunicorn_refuses_an_open_port_without_authentication(tmp_path, monkeypatch) -> None:
    import importlib
    import os
    import subprocess
    import sys

    # importing the config file sets PROMETHEUS_MULTIPROC_DIR when unset: keep that out of this process
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    _open_binds = importlib.import_module("backend.api.gunicorn_conf")._open_binds

    assert _open_binds(["0.0.0.0:9090", "[::]:9090", "10.1.2.3:80"]) == [
        "0.0.0.0:9090",
        "[::]:9090",
        "10.1.2.3:80",
    ]
    assert _open_binds(["127.0.0.1:9090", "[::1]:9090", "localhost:9090", "unix:/tmp/s", "127.0.0.5:1"]) == []
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BASIC_AUTH_", "COSOD_ALLOW"))}
    env.update(MODEL_DIR=str(tmp_path / "m"), PYTHONPATH=os.pathsep.join([str(repo), str(repo / "tests")]))
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:backend.api.gunicorn_conf"]
    cmd += ["--bind", "0.0.0.0:1", "metrics_app:create()"]  # refused before any socket is made
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "refusing to serve on 0.0.0.0:1 without authentication" in done.stdout + done.stderr
