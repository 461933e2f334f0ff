"""The Flask app through its test client, with the real Pipeline on the tiny backbone."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from backend.api.app import create_app
from backend.labelstudio.regions import rle_to_mask
from backend.settings import Settings

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"
BRUSH = (CONFIGS / "brush_grouped.xml").read_text()
POLY = (CONFIGS / "polygon.xml").read_text()
BITMASK = (CONFIGS / "bitmask.xml").read_text()
RECT = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image">'
    '<Label value="A"/></RectangleLabels></View>'
)
VERSION = re.compile(r"^scosparc-p(\d+)-[0-9a-f]{8}$")


class Spy:
    """Wraps the real pipeline and records the group sizes it was asked for."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[int] = []

    @property
    def version_id(self) -> str:
        return self.inner.version_id

    def predict_group(self, images: list[np.ndarray]) -> Any:
        self.calls.append(len(images))
        return self.inner.predict_group(images)


def make_png(
    seed: int, size: tuple[int, int] = (96, 72), color: tuple[int, int, int] = (220, 30, 30)
) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    img = (rng.random((h, w, 3)) * 60 + 100).astype(np.uint8)
    x0, y0 = int(rng.integers(5, w // 2)), int(rng.integers(5, h // 2))
    img[y0 : y0 + h // 3, x0 : x0 + w // 3] = color
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def serve_tasks(fake_ls: Any, tasks: list[dict[str, Any]]) -> None:
    def handler(query: dict, headers: dict) -> tuple:
        page, size = int(query.get("page", ["1"])[0]), int(query.get("page_size", ["100"])[0])
        chunk = tasks[(page - 1) * size : page * size]
        if not chunk and page > 1:
            return 404, {"Content-Type": "application/json"}, b"{}"
        body = {"tasks": chunk, "total": len(tasks), "total_annotations": 0, "total_predictions": 0}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    fake_ls.add_handler("/api/tasks/", handler)


def project_with_groups(
    fake_ls: Any, groups: dict[str, int], *, size: tuple[int, int] = (96, 72), field: str | None = "group"
) -> list[dict[str, Any]]:
    tasks, tid = [], 100
    for g, n in groups.items():
        for k in range(n):
            tid += 1
            path = f"/data/upload/12/{g}-{k}.png"
            fake_ls.add_bytes(path, make_png(tid, size))
            data = {"image": path}
            if field:
                data[field] = g
            tasks.append({"id": tid, "data": data, "project": 12})
    serve_tasks(fake_ls, tasks)
    return tasks


@pytest.fixture
def spy(tiny_pipeline: Any) -> Spy:
    return Spy(tiny_pipeline)


@pytest.fixture
def make_client(fake_ls: Any, spy: Spy, tmp_path: Path):
    def make(factory: Any = None, wait: bool = True, **kw: Any):
        settings = Settings(
            **{
                "model_dir": str(tmp_path / "model_dir"),
                "label_studio_url": fake_ls.url,
                "label_studio_api_key": "tok",
                "backbone": "tiny",
                **kw,
            }
        )
        app = create_app(settings, factory or (lambda s: spy))
        if wait:
            app.extensions["cosod"]["loader"].wait(30)
        return app.test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


def setup(client: Any, project: str = "12.1795340308", schema: str = BRUSH, **extra: Any) -> Any:
    return client.post(
        "/setup",
        json={
            "project": project,
            "schema": schema,
            "hostname": "http://localhost:8080",
            "access_token": "legacy",
            **extra,
        },
    )


def predict(client: Any, tasks: list[dict[str, Any]], config: str | None = BRUSH, **body: Any) -> Any:
    payload = {
        "tasks": tasks,
        "project": "12.1795340308",
        "params": {"login": None, "password": None, "context": None},
        **body,
    }
    if config is not None:
        payload["label_config"] = config
    return client.post("/predict", json=payload)


# -- /health ------------------------------------------------------------------------------------------
def test_health_ready(client) -> None:
    for path in ("/health", "/"):
        r = client.get(path)
        assert r.status_code == 200 and r.json["status"] == "UP" and r.json["ready"] is True
        assert r.json["redis"] == "not configured"


def test_health_while_loading_and_setup_does_not_wait_for_it(make_client, spy) -> None:
    release = threading.Event()

    def slow(settings: Settings) -> Spy:
        release.wait(20)
        return spy

    client = make_client(factory=slow, wait=False)
    try:
        r = client.get("/health")
        assert r.status_code == 503 and r.json["status"] == "LOADING" and r.json["ready"] is False
        t0 = time.perf_counter()
        r = setup(client)
        assert time.perf_counter() - t0 < 2.9
        assert r.status_code == 503 and "still loading" in r.json["error"]
        r = predict(client, [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}])
        assert r.status_code == 503
    finally:
        release.set()


def test_missing_weights_are_reported_by_health_and_setup(fake_ls, tmp_path) -> None:
    # the default backbone, whose weights file is not in weights_dir
    settings = Settings(label_studio_url=fake_ls.url, weights_dir=str(tmp_path), model_dir=str(tmp_path))
    app = create_app(settings)
    app.extensions["cosod"]["loader"].wait(60)
    c = app.test_client()
    r = c.get("/health")
    assert r.status_code == 503 and r.json["status"] == "ERROR"
    assert "vit_small_patch8_224.dino.safetensors" in r.json["error"]
    assert "cosod weights fetch vit_small_patch8_224.dino" in r.json["error"]
    r = setup(c)
    assert r.status_code == 503 and "cosod weights fetch" in r.json["error"]


def test_default_factory_builds_the_tiny_backbone(fake_ls) -> None:
    app = create_app(Settings(backbone="tiny", label_studio_url=fake_ls.url))
    assert app.extensions["cosod"]["loader"].wait(120)
    assert app.test_client().get("/health").json["pipeline_version"]


def test_health_checks_redis(make_client) -> None:
    ok = make_client(redis_url="redis://127.0.0.1:6379/15").get("/health")
    if ok.json["redis"] != "ok":
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({ok.json['redis']})")
    assert ok.status_code == 200
    bad = make_client(redis_url="redis://127.0.0.1:1/0").get("/health")
    assert bad.status_code == 503 and bad.json["status"] == "DEGRADED" and "unreachable" in bad.json["redis"]
    assert bad.json["batch_ready"] is False and "Redis is unreachable" in bad.json["batch"]


def test_health_counts_live_workers_and_says_when_batch_jobs_cannot_run(make_client) -> None:
    """/health counts the workers' liveness keys (they expire: a killed worker drops out) and
    ``batch_ready`` says whether POST /jobs/prelabel can run now."""
    import redis

    from backend.jobs.rqueue import mark_alive

    client = make_client(redis_url="redis://127.0.0.1:6379/15")
    first = client.get("/health")
    if first.json["redis"] != "ok":
        pytest.skip(f"no Redis on 127.0.0.1:6379 ({first.json['redis']})")
    r = redis.Redis.from_url("redis://127.0.0.1:6379/15")
    r.flushdb()
    try:
        body = client.get("/health").json
        assert body["workers"] == 0 and body["batch_ready"] is False and body["ready"] is True
        assert "no cosod-worker is alive on queue 'cosod'" in body["batch"]
        mark_alive(r, "cosod", "w1", 1.5)
        mark_alive(r, "cosod", "w2", 60)
        mark_alive(r, "cosod:other", "w3", 60)  # another queue's
        r.sadd("rq:workers", "rq:worker:ghost")  # a record RQ left behind: not a heartbeat
        body = client.get("/health").json
        assert body["workers"] == 2 and body["batch_ready"] is True and body["batch"].startswith("2 worker")
        time.sleep(1.6)
        assert client.get("/health").json["workers"] == 1
    finally:
        r.flushdb()
    in_process = make_client().get("/health").json
    assert in_process["batch_ready"] is True and in_process["batch"] == "in-process"


# -- /setup and model_version -------------------------------------------------------------------------
def test_setup_version_is_stable_and_per_project(client, make_client, spy) -> None:
    t0 = time.perf_counter()
    v1 = setup(client).json["model_version"]
    assert time.perf_counter() - t0 < 1.0
    m = VERSION.match(v1)
    assert m and m.group(1) == "12"
    assert setup(client).json["model_version"] == v1
    assert setup(make_client()).json["model_version"] == v1  # another process computes the same
    v2 = setup(client, project="13.1795340999").json["model_version"]
    assert v2.startswith("scosparc-p13-") and v2 != v1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"schema": BRUSH}, 400, "needs 'project'"),
        ({"project": "abc", "schema": BRUSH}, 400, "'project' must be a positive integer id"),
        (
            {"project": "12.1795340308", "schema": RECT},
            400,
            "no BrushLabels, BitmaskLabels or PolygonLabels.*<BrushLabels",
        ),
        (
            {"project": "12.1795340308", "schema": BRUSH, "extra_params": {"group_by": "folder"}},
            400,
            "group_by",
        ),
        ({"project": "12.1795340308", "schema": BRUSH, "extra_params": "not json"}, 400, "extra_params"),
        ({"project": "12.1795340308", "schema": 5}, 400, "schema"),
    ],
)
def test_setup_bad_input(client, body: dict, status: int, message: str) -> None:
    r = client.post("/setup", json=body)
    assert r.status_code == status and re.search(message, r.json["error"]), r.json


def test_malformed_json_everywhere(client) -> None:
    for path in ("/setup", "/predict", "/webhook"):
        r = client.post(path, data=b"{not json", content_type="application/json")
        assert r.status_code == 400 and "JSON object" in r.json["error"]
        r = client.post(path, data=b"", content_type="application/json")
        assert r.status_code == 400


# -- /predict -----------------------------------------------------------------------------------------
def test_predict_batch_one_result_per_task_with_the_setup_version(client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"cats": 4, "dogs": 4})
    version = setup(client).json["model_version"]
    r = predict(client, tasks)
    assert r.status_code == 200
    results = r.json["results"]
    assert len(results) == 8 and "errors" not in r.json
    for item in results:
        assert item["model_version"] == version and 0.0 <= item["score"] <= 1.0
        (region,) = item["result"]
        assert (region["original_width"], region["original_height"]) == (96, 72)
        assert region["from_name"] == "tag" and region["to_name"] == "image"
        assert region["value"]["brushlabels"] == ["Object"]
        mask = rle_to_mask(region["value"]["rle"], 72, 96)
        assert mask.shape == (72, 96) and set(np.unique(mask)) <= {0, 255} and mask.any()
    assert sorted(spy.calls) == [4, 4]  # one computation per group, each on the whole group


def test_one_task_is_predicted_from_its_whole_group_and_the_next_is_cached(client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"cats": 5, "dogs": 3})
    setup(client)
    r = predict(client, [tasks[1]])
    assert r.status_code == 200 and len(r.json["results"]) == 1
    assert spy.calls == [5]
    r2 = predict(client, [tasks[3]])
    assert r2.status_code == 200 and spy.calls == [5]  # same group: from the cache
    metrics = client.get("/metrics").get_data(as_text=True)
    assert re.search(r"cosod_group_cache_hits_total 1\b", metrics)
    predict(client, [tasks[6]])
    assert spy.calls == [5, 3]


def test_cached_answer_is_identical(client, fake_ls) -> None:
    tasks = project_with_groups(fake_ls, {"g": 3})
    setup(client)
    first = predict(client, [tasks[0]]).json
    again = predict(client, [tasks[0]]).json
    assert first == again


def test_tasks_without_a_group_field_form_the_project_group(client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"a": 2, "b": 2}, field=None)
    setup(client)
    assert predict(client, [tasks[0]]).status_code == 200
    assert spy.calls == [4]


def test_group_by_override_through_extra_params(client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"a": 2, "b": 3})
    setup(client, extra_params={"group_by": "project"})
    predict(client, [tasks[0]], config=None)
    assert spy.calls == [5]


def test_extra_params_reach_every_worker_through_model_dir(make_client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"a": 2, "b": 3})
    worker_a, worker_b = make_client(), make_client()
    predict(worker_b, [tasks[0]])  # b knows the project from an earlier request, grouped by field
    assert spy.calls == [2]
    setup(worker_a, extra_params={"group_by": "project"})  # LS's /setup lands on worker a
    predict(worker_b, [tasks[2]])
    assert spy.calls == [2, 5]


def test_large_group_is_capped_to_k_references(make_client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"big": 12}, size=(40, 32))
    client = make_client(max_refs=3, max_group_images=6)
    setup(client)
    predict(client, [tasks[-1]])
    assert spy.calls == [4]  # the asked task + 3 references


def test_group_members_fall_back_to_the_request_when_label_studio_is_down(make_client, fake_ls, spy) -> None:
    tasks = project_with_groups(fake_ls, {"g": 4})
    fake_ls.add_json("/api/tasks/", {"detail": "boom"}, status=500)
    client = make_client()
    setup(client)
    r = predict(client, tasks[:2])
    assert r.status_code == 200 and len(r.json["results"]) == 2 and spy.calls == [2]


def test_polygon_config(client, fake_ls) -> None:
    tasks = project_with_groups(fake_ls, {"g": 3})
    setup(client, schema=POLY)
    r = predict(client, tasks, config=POLY)
    assert r.status_code == 200
    for item in r.json["results"]:
        assert item["result"] and {reg["type"] for reg in item["result"]} == {"polygonlabels"}
        for reg in item["result"]:
            pts = np.asarray(reg["value"]["points"])
            assert pts.shape[1] == 2 and (pts >= 0).all() and (pts <= 100).all()


def test_bitmask_config_gives_the_brush_masks_as_png_data_urls(client, fake_ls) -> None:
    from label_studio_sdk.converter.brush import decode_rle

    from backend.labelstudio.bitmask import data_url_to_mask

    tasks = project_with_groups(fake_ls, {"g": 3}, size=(80, 60))
    setup(client, schema=BRUSH)
    brush = predict(client, tasks).json["results"]
    setup(client, schema=BITMASK)
    r = predict(client, tasks, config=BITMASK)
    assert r.status_code == 200
    for b_item, item in zip(brush, r.json["results"], strict=True):
        (b_reg,) = b_item["result"]
        (reg,) = item["result"]
        assert reg["type"] == "bitmasklabels" and reg["value"]["bitmasklabels"] == ["Object"]
        assert (reg["original_width"], reg["original_height"]) == (80, 60)
        assert (reg["score"], item["score"], item["model_version"]) == (
            b_reg["score"],
            b_item["score"],
            b_item["model_version"],
        )
        expected = np.asarray(decode_rle(b_reg["value"]["rle"])).reshape(60, 80, 4)[:, :, 3] > 0
        assert expected.any() and np.array_equal(
            data_url_to_mask(reg["value"]["imageDataURL"], 60, 80), expected
        )


def test_corrupt_image_gets_an_empty_result_and_others_are_predicted(client, fake_ls, caplog) -> None:
    tasks = project_with_groups(fake_ls, {"g": 3})
    fake_ls.add_bytes(tasks[1]["data"]["image"], b"\x89PNG\r\n\x1a\ngarbage")
    setup(client)
    with caplog.at_level("WARNING"):
        r = predict(client, tasks)
    assert r.status_code == 200
    res = r.json["results"]
    assert res[1]["result"] == [] and "not a readable image" in res[1]["error"]
    assert res[0]["result"] and res[2]["result"]
    assert r.json["errors"][0]["task"] == tasks[1]["id"]
    assert any("not decodable" in rec.getMessage() for rec in caplog.records)


def test_refused_and_oversized_images(make_client, fake_ls) -> None:
    tasks = project_with_groups(fake_ls, {"g": 3})
    tasks[0] = {**tasks[0], "data": {**tasks[0]["data"], "image": "http://evil.example/x.png"}}
    serve_tasks(fake_ls, tasks)
    fake_ls.add_bytes(tasks[1]["data"]["image"], make_png(1, (400, 300)))
    client = make_client(max_image_pixels=100_000)
    setup(client)
    r = predict(client, tasks)
    assert r.status_code == 200
    res = r.json["results"]
    assert "result" not in res[0] and "not allowed" in res[0]["error"]  # LS stores nothing for it
    assert "result" not in res[1] and "over the limit of 100000 pixels" in res[1]["error"]
    assert res[2]["result"]
    kinds = {e["task"]: e["kind"] for e in r.json["errors"]}
    assert kinds == {tasks[0]["id"]: "image_refused", tasks[1]["id"]: "image_refused"}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"project": "12.1795340308"}, 400, "needs 'tasks'"),
        ({"tasks": [], "project": "12.1795340308"}, 400, "needs 'tasks'"),
        ({"tasks": "x", "project": "12.1795340308"}, 400, "needs 'tasks'"),
        ({"tasks": [{"data": {}}]}, 400, "needs 'project'"),
        ({"tasks": [{"id": 1}], "project": "12.1795340308", "label_config": BRUSH}, 400, "'data' object"),
        (
            {"tasks": [{"id": "x", "data": {}}], "project": "12.1795340308", "label_config": BRUSH},
            400,
            "'id' must be a positive integer id",
        ),
        ({"tasks": [5], "project": "12.1795340308", "label_config": BRUSH}, 400, "must be an object"),
        (
            {"tasks": [{"id": 1, "data": {}}], "project": "12.1795340308", "label_config": RECT},
            400,
            "<BrushLabels",
        ),
        ({"tasks": [{"id": 1, "data": {}}], "project": "77.1795340308"}, 404, "unknown project 77"),
    ],
)
def test_predict_bad_input(client, body: dict, status: int, message: str) -> None:
    r = client.post("/predict", json=body)
    assert r.status_code == status and re.search(message, r.json["error"]), r.json
    assert "Traceback" not in r.get_data(as_text=True)


def test_project_unknown_to_label_studio(client, fake_ls) -> None:
    fake_ls.add_json("/api/tasks/", {"detail": "Not found."}, status=404)
    r = predict(client, [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}])
    assert r.status_code == 404 and "no project 12" in r.json["error"]


def test_internal_failure_is_json_without_traceback(make_client, fake_ls) -> None:
    class Broken:
        version_id = "x"

        def predict_group(self, images: list) -> Any:
            raise RuntimeError("secret internals")

    tasks = project_with_groups(fake_ls, {"g": 2})
    client = make_client(factory=lambda s: Broken())
    r = predict(client, tasks)
    assert r.status_code == 500 and "RuntimeError" in r.json["error"]
    assert "secret internals" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)


# -- /webhook, /versions, /metrics, auth --------------------------------------------------------------
def test_webhook_is_fast_and_counts_events(client) -> None:
    assert setup(client).status_code == 200  # corrections are stored only for a project set up
    payload = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1, "result": []},
        "task": {"id": 5, "data": {"image": "/data/upload/12/a.png"}},
        "project": {"id": 12},
    }
    t0 = time.perf_counter()
    r = client.post("/webhook", json=payload)
    assert time.perf_counter() - t0 < 1.0
    assert r.status_code == 200 and r.json["status"] == "ok" and r.json["task"] == 5
    assert r.json["stored"] == "inserted"  # an empty result is stored as "no object in this image"
    assert r.json["propagation_job"].startswith("propagate-p12-")  # queued, never computed here
    assert client.post("/webhook", json={"action": "PROJECT_CREATED"}).json["status"] == "ignored"
    assert client.post("/webhook", json={"annotation": {}}).status_code == 400
    text = client.get("/metrics").get_data(as_text=True)
    assert 'cosod_webhook_events_total{action="ANNOTATION_CREATED"} 1' in text


def test_a_bulk_delete_is_handled_and_answered_ok(client) -> None:
    assert setup(client).status_code == 200
    created = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 3, "result": []},
        "task": {"id": 6, "data": {"image": "/data/upload/12/b.png"}},
        "project": {"id": 12},
    }
    assert client.post("/webhook", json=created).json["stored"] == "inserted"
    bulk = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 3}], "project": {"id": 12}}
    r = client.post("/webhook", json=bulk)
    assert r.status_code == 200 and r.json["status"] == "ok", r.json  # it answered "ignored" before


def test_versions(client) -> None:
    version = setup(client).json["model_version"]
    r = client.get("/versions")
    assert r.status_code == 200 and r.json["versions"] == [version]
    assert client.get("/versions?project=12.1795340308").json["model_version"] == version
    assert client.post("/versions").status_code == 405


def test_metrics_text(client, fake_ls) -> None:
    tasks = project_with_groups(fake_ls, {"g": 2})
    setup(client)
    predict(client, tasks)
    client.post("/predict", json={})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'cosod_requests_total{method="POST",route="/predict",status="200"} 1' in text
    assert 'cosod_requests_total{method="POST",route="/predict",status="400"} 1' in text
    inf = {"route": "/predict", "le": "+Inf"}  # the library decides the order of the labels
    buckets = [s for f in text_string_to_metric_families(text) for s in f.samples if s.labels == inf]
    assert [(s.name, s.value) for s in buckets] == [("cosod_request_seconds_bucket", 2)]
    assert "cosod_group_cache_misses_total 1" in text and "cosod_backbone_ready 1" in text
    assert 'cosod_errors_total{kind="BadRequestError"} 1' in text
    assert "# TYPE cosod_request_seconds histogram" in text


def test_basic_auth(make_client) -> None:
    client = make_client(basic_auth_user="ml", basic_auth_pass="s3cret")
    r = client.get("/health")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/health", auth=("ml", "wrong")).status_code == 401
    assert client.get("/health", auth=("ml", "s3cret")).status_code == 200
    assert client.post("/setup", json={}, auth=("ml", "s3cret")).status_code == 400


def test_oversized_body_is_json_413(client, monkeypatch) -> None:
    client.application.config["MAX_CONTENT_LENGTH"] = 1000
    r = client.post("/predict", data=b"{" + b" " * 5000 + b"}", content_type="application/json")
    assert r.status_code == 413 and r.json["status"] == 413


def test_unknown_route_is_json(client) -> None:
    r = client.get("/nope")
    assert r.status_code == 404 and r.json["status"] == 404
