"""Learning from corrections through the HTTP app: webhooks store corrections at once and enqueue at most
one fine-tune per project; /versions and /metrics show the versions. Real SQLite file, real Redis (DB 11,
flushed), no worker, so the queued jobs stay visible."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from hostile_input import zero_rle
from redis_db import flushed, url

from backend.api.app import create_app
from backend.labelstudio.regions import brush_region
from backend.learning.store import Store
from backend.learning.versions import Registry
from backend.settings import Settings

REDIS_URL = url(11)


@pytest.fixture
def redis_url():
    with flushed(11):
        yield REDIS_URL


def annotation_event(project: int, task: int, annotation: int, rng: np.random.Generator) -> dict:
    mask = np.zeros((480, 640), dtype=bool)
    y, x = rng.integers(0, 300), rng.integers(0, 400)
    mask[y : y + 150, x : x + 200] = True
    region = brush_region(mask, from_name="tag", to_name="image", label="Object", score=1.0, rid=f"r{task}")
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": annotation, "task": task, "result": [region], "was_cancelled": False},
        "task": {
            "id": task,
            "project": project,
            "data": {"image": f"/data/upload/{project}/{task}.png", "group": f"g{task % 5}"},
        },
        "project": {"id": project},
    }


def fake_pipeline(settings):
    return SimpleNamespace(config=SimpleNamespace(model=settings.model_name), version_id="fixed")


CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Object"/></BrushLabels></View>'
)


def set_up(client, *projects: int) -> None:
    """``/setup`` as Label Studio calls it when the model is connected: webhooks of other projects are 404."""
    for pid in projects:
        r = client.post("/setup", json={"project": f"{pid}.1795340308", "schema": CONFIG})
        assert r.status_code == 200, r.get_json()


def test_a_burst_of_200_webhooks_is_stored_and_enqueues_one_finetune_per_project(tmp_path, redis_url):
    settings = Settings(model_dir=str(tmp_path), redis_url=redis_url, train_every=10)
    app = create_app(settings, pipeline_factory=fake_pipeline)
    set_up(app.test_client(), 1, 2)
    rng = np.random.default_rng(0)
    events = [annotation_event(1 + i % 2, 100 + i, 1000 + i, rng) for i in range(200)]
    durations: list[float] = []
    failures: list[str] = []

    def send(chunk):
        client = app.test_client()
        for ev in chunk:
            t = time.perf_counter()
            r = client.post("/webhook", json=ev)
            durations.append(time.perf_counter() - t)
            if r.status_code != 200:
                failures.append(r.get_data(as_text=True))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(events[k::4],)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = time.perf_counter() - t0
    print(
        f"200 webhooks in {total:.2f} s; slowest {max(durations) * 1000:.0f} ms, "
        f"mean {1000 * sum(durations) / len(durations):.0f} ms"
    )
    assert not failures
    assert total < 10.0 and max(durations) < 1.0
    store = Store(tmp_path)
    assert store.count_corrections(1) == 100 and store.count_corrections(2) == 100
    jobs = app.test_client().get("/jobs").get_json()["jobs"]
    finetunes = sorted(j["id"] for j in jobs if j["id"].startswith("finetune-"))
    assert finetunes == ["finetune-p1", "finetune-p2"]  # one per project, however many triggers


def test_redelivery_update_and_delete_through_the_webhook(tmp_path):
    app = create_app(Settings(model_dir=str(tmp_path), train_every=1000), pipeline_factory=fake_pipeline)
    client = app.test_client()
    set_up(client, 7)
    ev = annotation_event(7, 70, 700, np.random.default_rng(1))
    assert client.post("/webhook", json=ev).get_json()["stored"] == "inserted"
    assert client.post("/webhook", json=ev).get_json()["stored"] == "unchanged"  # re-delivered
    ev2 = annotation_event(7, 70, 700, np.random.default_rng(2))
    ev2["action"] = "ANNOTATION_UPDATED"
    assert client.post("/webhook", json=ev2).get_json()["stored"] == "updated"
    assert Store(tmp_path).count_corrections(7) == 1
    ev2["action"] = "ANNOTATION_DELETED"
    client.post("/webhook", json=ev2)
    assert Store(tmp_path).count_corrections(7) == 0
    bad = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}, "project": {"id": 7}}
    r = client.post("/webhook", json=bad)
    assert r.status_code == 400 and "ANNOTATION_CREATED" in r.get_json()["error"]


def test_versions_and_metrics_list_registered_versions_with_scores(tmp_path):
    app = create_app(Settings(model_dir=str(tmp_path)), pipeline_factory=fake_pipeline)
    client = app.test_client()
    config = (
        '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
        '<Label value="Object"/></BrushLabels></View>'
    )
    setup = client.post("/setup", json={"project": "3.1795340308", "schema": config})
    base = setup.get_json()["model_version"]
    assert base.startswith("scosparc-p3-")
    registry = Registry(Store(tmp_path))
    assert registry.list_versions(3) == []
    body = client.get("/versions?project=3").get_json()
    assert body["versions"] == [base] and body["projects"][0]["active"] == base


def test_hostile_webhooks_get_a_json_4xx_and_store_nothing(tmp_path):
    """Issue 13 through the route Label Studio calls: nothing here is a 500, nothing is stored."""
    app = create_app(Settings(model_dir=str(tmp_path), train_every=1000), pipeline_factory=fake_pipeline)
    client = app.test_client()
    set_up(client, 7)
    rng = np.random.default_rng(3)

    def post(ev):
        r = client.post("/webhook", json=ev)
        return r.status_code, r.get_json()

    huge = annotation_event(7, 70, 700, rng)
    region = huge["annotation"]["result"][0]
    region.update(original_width=16384, original_height=16384)
    region["value"]["rle"] = zero_rle(4 * 16384 * 16384)
    status, body = post(huge)
    assert 400 <= status < 500 and "16384x16384" in body["error"] and "50000000" in body["error"], body
    too_big_id = annotation_event(7, 70, 2**63, rng)
    status, body = post(too_big_id)
    assert status == 400 and "below 2**63" in body["error"], body
    other_project = annotation_event(7, 70, 700, rng)
    other_project["task"]["project"] = 8
    status, body = post(other_project)
    assert 400 <= status < 500 and "task.project is 8" in body["error"], body
    status, body = post(annotation_event(9, 90, 900, rng))  # project 9 was never set up
    assert status == 404 and "project 9 is not set up" in body["error"], body
    assert Store(tmp_path).count_corrections(7) == 0 and Store(tmp_path).projects() == []

    forged = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": k} for k in range(1, 10_001)]}
    forged["project"] = {"id": 7}
    t0 = time.perf_counter()
    status, body = post(forged)
    print(f"forged 10,000-id deletion through /webhook: {time.perf_counter() - t0:.3f} s")
    assert status == 200 and body["stored"] == "unchanged", body
    status, body = post(annotation_event(7, 70, 4242, rng))  # an id of the forged list
    assert status == 200 and body["stored"] == "inserted", body
