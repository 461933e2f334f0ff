"""The opt-in absence decision on the backend side: the project setting, the "no common object" choice in
the label config, predictions through the Flask app, corrections and the propagation job.

Known answers: a planted group (tests/planted.py, tests/test_propagate.py's ``planted``) of 10 images where
images 2 and 7 lack the object; with ``{"absence": true}`` exactly those two get no mask, score 0.0 and the
choice, the others their mask (IoU > 0.8 with the object); off, every image gets a mask and the version is
the official one. No Redis (the in-process queue)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.api.app import create_app
from backend.errors import BadRequestError, LabelConfigError
from backend.labelstudio.choices import ABSENCE_VALUE, AbsenceChoice, choice_region, selects_absence
from backend.labelstudio.labelconfig import parse_label_config
from backend.labelstudio.regions import brush_region, rle_to_mask_fast
from backend.prediction.absence import SUFFIX, AbsencePipeline
from backend.settings import Settings
from tests.planted import PlantedPipeline, planted_group, png

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"
ABSENCE_XML = (CONFIGS / "brush_absence.xml").read_text()
BRUSH_XML = (CONFIGS / "brush_grouped.xml").read_text()
ABSENT = (2, 7)
N = 10
VERSION = re.compile(r"^scosparc-p(\d+)-[0-9a-f]{8}$")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


# -- the label config -----------------------------------------------------------------------------------
def test_the_shipped_config_has_the_choice_by_convention() -> None:
    cfg = parse_label_config(ABSENCE_XML)
    assert cfg.absence == AbsenceChoice("absence", "image", ABSENCE_VALUE)
    (c,) = cfg.controls
    assert (c.kind, c.from_name, c.to_name, c.label) == ("brushlabels", "tag", "image", "Object")
    assert parse_label_config(BRUSH_XML).absence is None  # no Choices: no choice, nothing refused


def xml(choices: str, image: str = '<Image name="image" value="$image"/>') -> str:
    return (
        f'<View>{image}<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>'
        f"{choices}</View>"
    )


def test_choice_found_by_value_alias_or_convention_on_the_image_only() -> None:
    two = xml(
        '<Choices name="q" toName="image"><Choice value="Cat"/><Choice value="Empty" alias="none"/></Choices>'
    )
    assert parse_label_config(two, absence_choice="Empty").absence == AbsenceChoice("q", "image", "none")
    assert parse_label_config(two, absence_choice="none").absence == AbsenceChoice("q", "image", "none")
    assert parse_label_config(two).absence is None  # no conventional value, none named
    loose = xml('<Choices name="q" toName="image"><Choice value="  no COMMON object "/></Choices>')
    assert parse_label_config(loose).absence == AbsenceChoice("q", "image", "  no COMMON object ")
    # a Choices on another image (another data key) does not count
    other = xml(
        '<Choices name="q" toName="thumb"><Choice value="No common object"/></Choices>',
        image='<Image name="image" value="$image"/><Image name="thumb" value="$image"/>',
    )
    assert parse_label_config(other).absence == AbsenceChoice("q", "thumb", ABSENCE_VALUE)  # same key
    elsewhere = xml(
        '<Choices name="q" toName="thumb"><Choice value="No common object"/></Choices>',
        image='<Image name="image" value="$image"/><Image name="thumb" value="$other"/>',
    )
    assert parse_label_config(elsewhere).absence is None


@pytest.mark.parametrize(
    ("config", "name", "message"),
    [
        (
            ABSENCE_XML,
            "Nothing here",
            r"absence_choice 'Nothing here'.*choices on the image are \['No common",
        ),
        (BRUSH_XML, "No common object", "it has no <Choices> on the image"),
        (ABSENCE_XML, "x" * 300, "absence_choice .* over the limit of 256"),
        (
            ABSENCE_XML.replace('name="absence"', f'name="{"n" * 300}"'),
            None,
            "<Choices name=...> .* over the",
        ),
    ],
)
def test_a_named_choice_that_the_config_lacks_is_refused(config: str, name: str | None, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(config, absence_choice=name)


def test_selects_absence_reads_only_the_choice_of_its_control() -> None:
    choice = AbsenceChoice("absence", "image", ABSENCE_VALUE)
    region = choice_region(choice, 5)
    assert region["type"] == "choices" and region["value"] == {"choices": [ABSENCE_VALUE]}
    assert selects_absence([region], choice)
    assert not selects_absence([{**region, "from_name": "other"}], choice)
    assert not selects_absence([{**region, "value": {"choices": ["Cat"]}}], choice)
    for junk in (None, "x", [None, 3, {"type": "choices", "value": "No common object"}], [{"value": []}]):
        assert not selects_absence(junk, choice)
    assert not selects_absence([region], None)


# -- the Flask app with the planted pipeline ------------------------------------------------------------
@pytest.fixture(scope="module")
def group() -> Any:
    feats, images, obj = planted_group(N, ABSENT, seed=5)
    return images, obj, PlantedPipeline(feats, images)


@pytest.fixture
def app(group, fake_ls, tmp_path) -> Any:
    """``make(**settings)``: the app serving the planted pipeline; the fake Label Studio lists tasks 1..10
    of group "g" (images of the planted group) in project 12."""
    images, _, pipeline = group
    tasks = []
    for k, im in enumerate(images):
        path = f"/data/upload/12/p{k}.png"
        fake_ls.add_bytes(path, png(im), headers={"Content-Type": "image/png"})
        tasks.append({"id": k + 1, "data": {"image": path, "group": "g"}, "project": 12})

    def handler(query: dict, headers: dict) -> tuple:
        import json

        page = int(query.get("page", ["1"])[0])
        if page > 1:
            return 404, {"Content-Type": "application/json"}, b"{}"
        body = {"tasks": tasks, "total": len(tasks), "total_annotations": 0, "total_predictions": 0}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    fake_ls.add_handler("/api/tasks/", handler)

    def make(**kw: Any) -> Any:
        s = Settings(
            model_dir=str(tmp_path / "model_dir"),
            label_studio_url=fake_ls.url,
            label_studio_api_key="tok",
            backbone="tiny",
            **kw,
        )
        a = create_app(s, lambda _: pipeline)
        assert a.extensions["cosod"]["loader"].wait(60)
        return a.test_client()

    yield make, tasks


def setup(client: Any, project: int, schema: str, extra: Any) -> Any:
    return client.post(
        "/setup",
        json={
            "project": f"{project}.1795340308",
            "schema": schema,
            "hostname": "http://x",
            "extra_params": extra,
        },
    )


def predict(client: Any, project: int, tasks: list[dict[str, Any]], schema: str) -> Any:
    body = {"tasks": [{**t, "project": project} for t in tasks], "project": f"{project}.1795340308"}
    return client.post("/predict", json={**body, "label_config": schema})


def mask_of(item: dict[str, Any]) -> np.ndarray:
    (region,) = [r for r in item["result"] if r["type"] == "brushlabels"]
    return rle_to_mask_fast(region["value"]["rle"], region["original_height"], region["original_width"]) > 0


def test_absent_images_get_the_choice_no_mask_and_score_zero(app, group) -> None:
    make, tasks = app
    _, obj, _ = group
    client = make()
    on = setup(client, 12, ABSENCE_XML, {"absence": True, "group_by": "field:group", "propagate": False})
    assert on.status_code == 200, on.json
    version = on.json["model_version"]
    assert version.endswith(SUFFIX) and VERSION.match(version.removesuffix(SUFFIX))
    r = predict(client, 12, tasks, ABSENCE_XML)
    assert r.status_code == 200, r.json
    items = r.json["results"]
    assert [i["model_version"] for i in items] == [version] * N
    for k, item in enumerate(items):
        if k in ABSENT:
            assert item["score"] == 0.0
            assert item["result"] == [choice_region(AbsenceChoice("absence", "image", ABSENCE_VALUE), k + 1)]
        else:
            assert [reg["type"] for reg in item["result"]] == ["brushlabels"], k
            assert item["score"] > 0.3 and iou(mask_of(item), obj[k]) > 0.8, k
    metrics = client.application.extensions["cosod"]["model"].metrics
    hits = metrics.group_cache_hits._value.get()
    again = predict(client, 12, tasks, ABSENCE_XML).json["results"]  # from the group cache: the same
    assert again == items and metrics.group_cache_hits._value.get() == hits + 1
    # the same project with the decision off: the official version, a mask everywhere, no choice
    off = setup(client, 12, ABSENCE_XML, {"absence": False, "group_by": "field:group", "propagate": False})
    assert off.json["model_version"] == version.removesuffix(SUFFIX)
    items = predict(client, 12, tasks, ABSENCE_XML).json["results"]
    assert all([reg["type"] for reg in i["result"]] == ["brushlabels"] for i in items)
    assert all(i["model_version"] == off.json["model_version"] for i in items)
    # GET /versions names the suffixed version while the decision is on
    setup(client, 12, ABSENCE_XML, {"absence": True, "group_by": "field:group", "propagate": False})
    assert client.get("/versions?project=12").json["model_version"] == version


def test_the_default_is_off_and_cosod_absence_turns_it_on(app) -> None:
    make, tasks = app
    client = make()
    plain = setup(client, 12, BRUSH_XML, {"group_by": "field:group", "propagate": False}).json[
        "model_version"
    ]
    assert VERSION.match(plain)
    client = make(absence=True)  # COSOD_ABSENCE=1
    on = setup(client, 12, BRUSH_XML, {"group_by": "field:group", "propagate": False}).json["model_version"]
    assert on == plain + SUFFIX
    # without a Choices in the config an absent image gets an empty result and score 0.0
    items = predict(client, 12, tasks, BRUSH_XML).json["results"]
    assert [k for k, i in enumerate(items) if not i["result"]] == list(ABSENT)
    assert all(items[k]["score"] == 0.0 for k in ABSENT)
    off = setup(client, 12, BRUSH_XML, {"absence": False, "group_by": "field:group", "propagate": False})
    assert off.json["model_version"] == plain


@pytest.mark.parametrize(
    ("extra", "schema", "message"),
    [
        ({"absence": "yes"}, ABSENCE_XML, "absence must be true or false, got 'yes'"),
        ({"absence": 1}, ABSENCE_XML, "absence must be true or false, got 1"),
        ({"absence": None}, ABSENCE_XML, "absence must be true or false, got None"),
        (
            {"absence": True, "absence_choice": 3},
            ABSENCE_XML,
            "absence_choice must be the value of a <Choice>",
        ),
        ({"absence": True, "absence_choice": " "}, ABSENCE_XML, "absence_choice must be the value"),
        ({"absence": True, "absence_choice": ["a"]}, ABSENCE_XML, "absence_choice must be the value"),
        ({"absence": True, "absence_choice": "Empty"}, ABSENCE_XML, "absence_choice 'Empty'"),
        ({"absence_choice": "No common object"}, BRUSH_XML, "it has no <Choices> on the image"),
    ],
)
def test_bad_settings_are_refused_at_setup_with_400(app, extra, schema, message) -> None:
    client = app[0]()
    r = setup(client, 12, schema, extra)
    assert r.status_code == 400, r.json
    assert message in r.json["error"], r.json


def test_cosod_absence_is_a_boolean_setting() -> None:
    assert Settings.from_env({}).absence is False
    assert Settings.from_env({"COSOD_ABSENCE": "1"}).absence is True
    with pytest.raises(ValueError, match="COSOD_ABSENCE"):
        Settings.from_env({"COSOD_ABSENCE": "sometimes"})


def test_the_wrapper_runs_the_decision_and_leaves_the_pipeline_alone(group) -> None:
    images, _, pipeline = group
    wrapped = AbsencePipeline(pipeline)
    assert wrapped.version_id == pipeline.version_id and wrapped.config.absence is False
    assert wrapped.predict_group(images).absence.absent == list(ABSENT)
    assert wrapped.predict_group(images, absence=False).absence is None
    assert pipeline.predict_group(images).absence is None  # the served base pipeline: the official path


# -- corrections ----------------------------------------------------------------------------------------
def annotation(aid: int, task: int, result: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 12},
        "task": {
            "id": task,
            "project": 12,
            "data": {"image": f"/data/upload/12/p{task - 1}.png", "group": "g"},
        },
        "annotation": {
            "id": aid,
            "task": task,
            "project": 12,
            "result": result,
            "updated_at": "2026-12-07T07:00:00Z",
        },
    }


def test_an_annotation_selecting_the_choice_is_an_empty_correction(app, group) -> None:
    make, _ = app
    _, obj, _ = group
    client = make()
    assert setup(client, 12, ABSENCE_XML, {"propagate": False, "group_by": "field:group"}).status_code == 200
    choice = choice_region(AbsenceChoice("absence", "image", ABSENCE_VALUE), 1)
    brush = brush_region(obj[0], from_name="tag", to_name="image", label="Object", score=1.0, rid="b")
    brush.pop("score")
    cases = {1: [choice], 2: [brush, choice], 4: [brush]}
    for task, result in cases.items():
        r = client.post("/webhook", json=annotation(100 + task, task, result))
        assert r.status_code == 200 and r.json["stored"] == "inserted", r.json
    store = client.application.extensions["cosod"]["model"].store
    rows = {c.task_id: c for c in store.load_corrections(12)[0]}
    assert rows[1].mask is None and rows[1].empty  # the choice alone
    assert rows[2].mask is None and rows[2].empty  # the choice wins over the brush
    assert rows[4].mask is not None and np.array_equal(rows[4].mask, obj[0])
    # a config without the choice: a choices region is not ours (ignored), as before
    assert setup(client, 12, BRUSH_XML, {"propagate": False, "group_by": "field:group"}).status_code == 200
    r = client.post("/webhook", json=annotation(200, 5, [choice]))
    assert r.json["stored"] == "ignored"


def test_hostile_annotations_with_the_choice_are_refused_or_ignored_never_500(app) -> None:
    client = app[0]()
    assert setup(client, 12, ABSENCE_XML, {"propagate": False, "group_by": "field:group"}).status_code == 200
    choice = choice_region(AbsenceChoice("absence", "image", ABSENCE_VALUE), 1)
    bad_results = [
        [{**choice, "value": None}],
        [{**choice, "value": {"choices": "No common object"}}],
        [{**choice, "value": {"choices": [{"x": 1}]}}],
        [choice] * 10_001,  # over the regions limit: the mask parser refuses it
        "not a list",
    ]
    statuses = []
    for k, result in enumerate(bad_results):
        r = client.post("/webhook", json=annotation(300 + k, 3, result))
        statuses.append(r.status_code)
        assert r.status_code < 500, r.json
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 422 and statuses[4] == 400


# -- the propagation job --------------------------------------------------------------------------------
def test_propagation_with_the_decision_on_writes_the_choice_for_absent_targets(group, tmp_path, monkeypatch):
    """One correction (task 1) of a planted group with a recurring distractor where images 4 and 8 lack the
    object: the job writes the choice (no mask, score 0) for tasks 5 and 9, masks for the others."""
    from backend.grouping import TaskRef
    from backend.jobs import propagation
    from backend.jobs import queue as jobqueue
    from backend.jobs.context import JobContext, install_context
    from backend.labelstudio import predictions as lspred
    from backend.prediction import build_model
    from tests.test_backend_propagation import FakeLS

    feats, images, obj = planted_group(N, (4, 8), seed=6, distractor=True)
    pipeline = PlantedPipeline(feats, images)
    s = Settings(
        model_dir=str(tmp_path),
        backbone="tiny",
        job_backoff=0.0,
        label_studio_url="http://ls.invalid",
        label_studio_api_key="k",
    )
    with jobqueue._queues_lock:
        jobqueue._queues.clear()
    model = build_model(
        s, lambda _: pipeline, schedule_propagation=lambda *a: propagation.schedule_propagation(s, *a)
    )
    project = model.project(12, ABSENCE_XML, {"absence": True, "group_by": "field:group"})
    version = model.serving(project, timeout=60)[1]
    assert version.endswith(SUFFIX)
    ls = FakeLS(version)
    ls.tasks = [TaskRef(k + 1, {"image": f"p{k}", "group": "g"}) for k in range(N)]
    ls.preds = {}
    ls.read_image = lambda url, task_id, project_id=None: images[int(url[1:])]  # type: ignore[method-assign]
    install_context(JobContext(s, model.loader, ls, model))  # type: ignore[arg-type]
    for name in ("annotated_tasks", "task_predictions", "version_predictions", "update_prediction"):
        monkeypatch.setattr(lspred, name, lambda _ls, *a, _n=name: getattr(ls, _n)(*a))
    brush = brush_region(obj[0], from_name="tag", to_name="image", label="Object", score=1.0, rid="c")
    brush.pop("score")
    ls.annotated.add(1)
    payload = annotation(500, 1, [brush])
    payload["task"]["data"] = {"image": "p0", "group": "g"}
    info = model.fit("ANNOTATION_CREATED", payload)
    job = info["propagation_job"]
    q = jobqueue.get_queue(s)
    deadline = time.monotonic() + 120
    while (done := q.fetch(job)) is None or done.status not in ("finished", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.status == "finished", done.error
    assert done.result["created"] == list(range(2, N + 1)) and done.result["model_version"] == version
    expected = choice_region(AbsenceChoice("absence", "image", ABSENCE_VALUE), 0)
    for task in range(2, N + 1):
        (pred,) = ls.preds[task]
        if task - 1 in (4, 8):
            assert pred["score"] == 0.0 and [r["type"] for r in pred["result"]] == ["choices"], task
            assert pred["result"][0]["value"] == expected["value"]
        else:
            assert [r["type"] for r in pred["result"]] == ["brushlabels"], task
            assert iou(mask_of(pred), obj[task - 1]) > 0.8, task
    with jobqueue._queues_lock:
        jobqueue._queues.clear()


def test_bad_request_error_is_what_setup_raises_for_the_model_directly(group, tmp_path) -> None:
    from backend.prediction import build_model

    model = build_model(Settings(model_dir=str(tmp_path), backbone="tiny"), lambda _: group[2])
    with pytest.raises(BadRequestError, match="absence must be true or false"):
        model.project(3, ABSENCE_XML, {"absence": "on"})
    with pytest.raises(LabelConfigError, match="absence_choice 'Nope'"):
        model.project(3, ABSENCE_XML, {"absence_choice": "Nope"})
