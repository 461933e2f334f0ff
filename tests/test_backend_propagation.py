"""Propagation of corrections within a group (backend/jobs/propagation.py): the webhook queues one job per
group, the job re-predicts the group's unannotated tasks from its stored corrections and updates their
predictions in place. Here with the tiny backbone, the in-process queue and a Label Studio faked at the
client's level (the real one: tests/e2e/test_propagation.py).

Known answers: the group's images are noise with a coloured square (tests/e2e's ``group_png``); the
unprompted pipeline on the tiny random backbone misses the square (IoU 0), and one corrected image makes
every other image's mask cover it (IoU about 0.8); the masks the job writes are exactly those
``cosod.propagate.propagate`` computes from the same images and corrections."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from backend.errors import BadRequestError
from backend.grouping import GroupKey, TaskRef
from backend.jobs import propagation
from backend.jobs import queue as jobqueue
from backend.jobs.context import JobContext, install_context
from backend.jobs.propagation import propagation_job_id, schedule_propagation
from backend.jobs.protocol import is_job_id
from backend.labelstudio import predictions as lspred
from backend.labelstudio.regions import brush_region, rle_to_mask_fast
from backend.prediction import build_model
from backend.settings import Settings
from tests.e2e.conftest import group_png

REPO = Path(__file__).resolve().parents[1]
CONFIG = (REPO / "label_config" / "brush_grouped.xml").read_text()
COLOURS = [(220, 20, 30), (20, 40, 220)]
PID = 7
OLD = "older-version"


def image(group: int, k: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(group_png(group, k))).convert("RGB"))


def truth(group: int, k: int) -> np.ndarray:
    return np.all(image(group, k) == np.asarray(COLOURS[group], dtype=np.uint8), axis=2)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


class FakeLS:
    """What the job asks Label Studio, in memory: group "a" is tasks 1-6 (images 0-5 of group 0), group "b"
    tasks 11-13. Every task starts with one prediction of ``version`` (an empty result) and task 3 with
    one of an older version too; task 6 has none."""

    configured = True

    def __init__(self, version: str):
        self.tasks = [TaskRef(i, {"image": f"img://0/{i - 1}", "group": "a"}) for i in range(1, 7)]
        self.tasks += [TaskRef(i, {"image": f"img://1/{i - 11}", "group": "b"}) for i in range(11, 14)]
        self.annotated: set[int] = set()
        self.preds: dict[int, list[dict[str, Any]]] = {}
        self.next_id = 100
        for t in self.tasks:
            if t.id != 6:
                self.add(t.id, [], 0.0, version)
        self.add(3, [{"old": True}], 0.5, OLD)
        self.calls: dict[str, int] = {}
        self.hold = threading.Event()
        self.hold.set()
        self.lock = threading.Lock()

    def add(self, task: int, result: Any, score: float, version: str) -> int:
        self.next_id += 1
        self.preds.setdefault(task, []).append(
            {"id": self.next_id, "result": result, "score": score, "model_version": version, "updates": 0}
        )
        return self.next_id

    def count(self, name: str) -> None:
        with self.lock:
            self.calls[name] = self.calls.get(name, 0) + 1

    # LabelStudioClient's methods the job uses
    def project_tasks(self, project_id: int, **kw: Any) -> list[TaskRef]:
        self.count("list")
        return list(self.tasks)

    def read_image(self, url: str, task_id: int, *, project_id: int | None = None) -> np.ndarray:
        self.hold.wait(10)
        self.count("image")
        g, k = url.removeprefix("img://").split("/")
        return image(int(g), int(k))

    def create_prediction(self, task_id: int, result: Any, score: float, model_version: str) -> int:
        self.count("create")
        return self.add(task_id, result, score, model_version)

    # backend.labelstudio.predictions, patched to these
    def annotated_tasks(self, project_id: int, ids: Any) -> dict[int, bool]:
        self.count("annotated")
        known = {t.id for t in self.tasks}
        return {i: i in self.annotated for i in ids if i in known}

    def task_predictions(self, project_id: int, ids: Any, version: str) -> dict[int, Any]:
        """Task 5's predictions are "not listed": the job asks for them on their own."""
        self.count("states")
        known = {t.id for t in self.tasks}
        return {
            i: lspred.TaskPredictions(
                i in self.annotated, None if i == 5 else tuple(self.of_version(i, version))
            )
            for i in ids
            if i in known
        }

    def version_predictions(self, task_id: int, version: str) -> list[int]:
        self.count("versions")
        return self.of_version(task_id, version)

    def of_version(self, task_id: int, version: str) -> list[int]:
        return [p["id"] for p in self.preds.get(task_id, []) if p["model_version"] == version]

    def update_prediction(self, pred_id: int, task_id: int, result: Any, score: float) -> None:
        self.count("update")
        (p,) = [p for p in self.preds[task_id] if p["id"] == pred_id]
        p.update(result=result, score=score, updates=p["updates"] + 1)


@pytest.fixture
def env(tiny_pipeline, tmp_path, monkeypatch):
    """(model, fake Label Studio, settings, version) with the job context installed and an empty queue."""

    def make(**settings: Any) -> tuple[Any, FakeLS, Settings, str]:
        base = {"label_studio_url": "http://ls.invalid", "label_studio_api_key": "k", **settings}
        s = Settings(model_dir=str(tmp_path), backbone="tiny", job_backoff=0.0, **base)
        with jobqueue._queues_lock:
            jobqueue._queues.clear()
        model = build_model(
            s, lambda _: tiny_pipeline, schedule_propagation=lambda *a: schedule_propagation(s, *a)
        )
        project = model.project(PID, CONFIG, {})
        version = model.serving(project, timeout=60)[1]
        ls = FakeLS(version)
        install_context(JobContext(s, model.loader, ls, model))  # type: ignore[arg-type]
        for name in ("annotated_tasks", "task_predictions", "version_predictions", "update_prediction"):
            monkeypatch.setattr(lspred, name, lambda _ls, *a, _n=name: getattr(ls, _n)(*a))
        return model, ls, s, version

    yield make
    with jobqueue._queues_lock:
        jobqueue._queues.clear()


def event(
    ls: FakeLS, task_id: int, mask: np.ndarray | None, *, aid: int | None = None, when: str = ""
) -> dict:
    """ANNOTATION_CREATED of ``task_id`` with ``mask`` (None: an empty annotation); the task is annotated."""
    ls.annotated.add(task_id)
    t = next(t for t in ls.tasks if t.id == task_id)
    result = []
    if mask is not None:
        region = brush_region(mask, from_name="tag", to_name="image", label="Object", score=1.0, rid="c")
        region.pop("score")
        result = [region]
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": PID},
        "task": {"id": task_id, "project": PID, "data": dict(t.data)},
        "annotation": {
            "id": aid or 1000 + task_id,
            "task": task_id,
            "project": PID,
            "result": result,
            "updated_at": when or f"2026-12-07T05:00:{task_id:02d}Z",
        },
    }


def wait_done(s: Settings, job_id: str, timeout: float = 120.0) -> Any:
    q = jobqueue.get_queue(s)
    deadline = time.monotonic() + timeout
    while True:
        info = q.fetch(job_id)
        if info is not None and info.status in ("finished", "failed"):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def mask_of(pred: dict[str, Any]) -> np.ndarray:
    if not pred["result"]:
        return np.zeros((48, 64), bool)
    (region,) = pred["result"]
    v = region["value"]
    return rle_to_mask_fast(v["rle"], region["original_height"], region["original_width"]) > 0


def test_one_correction_updates_the_other_tasks_of_its_group_in_place(env, tiny_pipeline) -> None:
    from cosod.features import image_hash
    from cosod.propagate import propagate

    model, ls, s, version = env()
    before = tiny_pipeline.predict_group([image(0, k) for k in range(6)])
    assert all(iou(m, truth(0, k)) < 0.1 for k, m in enumerate(before.masks))  # the unprompted miss
    ls.annotated.add(2)  # a person annotated task 2 before: never touched
    info = model.fit("ANNOTATION_CREATED", event(ls, 1, truth(0, 0)))
    job = propagation_job_id(PID, GroupKey("field:group", "a"))
    assert info["stored"] == "inserted" and info["propagation_job"] == job and info["propagation_new"]
    done = wait_done(s, job)
    assert done.status == "finished", done.error
    r = done.result
    assert r["status"] == "propagated" and r["corrected_tasks"] == [1] and r["model_version"] == version
    assert r["updated"] == [3, 4, 5] and r["created"] == [6] and r["failed"] == []
    # one listing with the predictions before the push; only task 5 (not listed) asked on its own
    assert ls.calls["states"] == 1 and ls.calls["versions"] == 1 and ls.calls["update"] == 3
    # exactly one prediction of the version per task; the older version, the corrected and annotated
    # tasks and the other group are as they were
    for t in (1, 2, 3, 4, 5, 6, 11, 12, 13):
        assert len(ls.of_version(t, version)) == 1, t
    assert [p for p in ls.preds[3] if p["model_version"] == OLD][0]["result"] == [{"old": True}]
    for t in (1, 2, 11, 12, 13):
        assert ls.preds[t][0]["updates"] == 0 and ls.preds[t][0]["result"] == []
    # the masks are propagate()'s, and they find the object the unprompted pipeline missed
    imgs = [image(0, k) for k in (0, 2, 3, 4, 5)]
    feats = tiny_pipeline.encode(imgs, [image_hash(im) for im in imgs])
    direct = propagate(tiny_pipeline, feats, imgs, {0: truth(0, 0)})
    for k, t in zip((1, 2, 3, 4), (3, 4, 5, 6), strict=True):
        (pred,) = [p for p in ls.preds[t] if p["model_version"] == version]
        got = mask_of(pred)
        assert np.array_equal(got, direct.masks[k]), t
        assert pred["score"] == round(direct.scores[k], 4)
        assert iou(got, truth(0, t - 1)) > 0.6, (t, iou(got, truth(0, t - 1)))


def test_more_corrections_refine_and_an_empty_one_counts_as_no_object(env) -> None:
    model, ls, s, version = env()
    job = propagation_job_id(PID, GroupKey("field:group", "a"))
    model.fit("ANNOTATION_CREATED", event(ls, 1, truth(0, 0)))
    first = wait_done(s, job).result
    assert first["updated"] == [2, 3, 4, 5] and first["created"] == [6]
    # a second correction (task 2) and an empty one (task 6: "no common object here"): both exemplars
    info = model.fit("ANNOTATION_CREATED", event(ls, 2, truth(0, 1)))
    assert info["propagation_job"] == job
    second = wait_done(s, job).result
    assert second["corrected_tasks"] == [1, 2] and second["updated"] == [3, 4, 5, 6]
    model.fit("ANNOTATION_CREATED", event(ls, 6, None))
    third = wait_done(s, job).result
    assert third["corrected_tasks"] == [1, 2, 6] and third["updated"] == [3, 4, 5]
    for t in (3, 4, 5):
        (p,) = [p for p in ls.preds[t] if p["model_version"] == version]
        assert p["updates"] == 3 and iou(mask_of(p), truth(0, t - 1)) > 0.6
    # the task corrected as empty keeps its prediction of the second run: it is annotated now
    (p6,) = ls.preds[6]
    assert p6["updates"] == 1


def test_only_empty_corrections_leave_the_predictions_alone(env) -> None:
    model, ls, s, _ = env()
    job = model.fit("ANNOTATION_CREATED", event(ls, 1, None))["propagation_job"]
    r = wait_done(s, job).result
    assert r["status"] == "nothing" and "no foreground" in r["message"]
    assert ls.calls.get("update", 0) == 0 and ls.calls.get("create", 0) == 0


def test_corrections_in_quick_succession_share_one_job(env) -> None:
    model, ls, s, _ = env()
    ls.hold.clear()  # the job blocks reading its first image
    job = propagation_job_id(PID, GroupKey("field:group", "a"))
    first = model.fit("ANNOTATION_CREATED", event(ls, 1, truth(0, 0)))
    q = jobqueue.get_queue(s)
    deadline = time.monotonic() + 30
    while q.fetch(job).status != "started":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # while it runs: one follow-up, whatever the number of corrections
    again = [model.fit("ANNOTATION_CREATED", event(ls, t, truth(0, t - 1))) for t in (2, 3, 4)]
    assert first["propagation_job"] == job and first["propagation_new"]
    assert [a["propagation_job"] for a in again] == [f"{job}-again"] * 3
    assert [a["propagation_new"] for a in again] == [True, False, False]
    assert [a["propagation_state"] for a in again] == ["queued"] * 3
    ls.hold.set()
    r1, r2 = wait_done(s, job).result, wait_done(s, f"{job}-again").result
    # the first run saw the later corrections before it pushed, and computed again with them
    assert r1["corrected_tasks"] == [1, 2, 3, 4] and r1["rounds"] == 2
    assert r1["updated"] == [5] and r1["created"] == [6]
    assert r2["corrected_tasks"] == [1, 2, 3, 4] and r2["updated"] == [5, 6] and r2["created"] == []
    assert len(q.list(project=PID)) == 2  # no third job
    # a re-delivered event changes nothing and queues nothing
    again = model.fit("ANNOTATION_CREATED", event(ls, 4, truth(0, 3)))
    assert again["stored"] == "unchanged" and again["propagation_job"] is None
    assert "unchanged" in again["propagation"]


def test_turned_off_per_project_or_by_default(env, tmp_path) -> None:
    model, ls, s, _ = env()
    model.project(PID, CONFIG, {"propagate": False})
    info = model.fit("ANNOTATION_CREATED", event(ls, 1, truth(0, 0)))
    assert info["stored"] == "inserted" and info["propagation_job"] is None
    assert "off for this project" in info["propagation"]
    with pytest.raises(BadRequestError, match="propagate must be true or false, got 'no'"):
        model.project(PID, CONFIG, {"propagate": "no"})
    model, ls, s, _ = env(propagate=False)
    info = model.fit("ANNOTATION_CREATED", event(ls, 2, truth(0, 1)))
    assert info["propagation_job"] is None and "COSOD_PROPAGATE" in info["propagation"]
    model.project(PID, CONFIG, {"propagate": True})  # the project's setting wins over the default
    info = model.fit("ANNOTATION_CREATED", event(ls, 3, truth(0, 2)))
    assert info["propagation_job"] == propagation_job_id(PID, GroupKey("field:group", "a"))
    assert wait_done(s, info["propagation_job"]).result["corrected_tasks"] == [1, 2, 3]  # same MODEL_DIR
    model, ls, s, _ = env(label_studio_url=None)  # nowhere to write predictions: no job
    info = model.fit("ANNOTATION_CREATED", event(ls, 4, truth(0, 3)))
    assert info["propagation_job"] is None and "LABEL_STUDIO_URL" in info["propagation"]
    assert Settings.from_env({"COSOD_PROPAGATE": "0"}).propagate is False
    assert Settings.from_env({}).propagate is True


def test_the_job_ids_are_per_project_and_group() -> None:
    a, b = GroupKey("field:group", "a"), GroupKey("field:group", "b")
    ids = {propagation_job_id(p, k) for p in (1, 2) for k in (a, b, GroupKey("field:group", None))}
    assert len(ids) == 6 and all(is_job_id(i) for i in ids)
    assert propagation_job_id(1, a) == propagation_job_id(1, GroupKey("field:group", "a"))
    assert propagation.propagation_job_id(1, a).startswith("propagate-p1-")


def test_parts_are_pushed_while_the_next_are_computed(env, monkeypatch) -> None:
    """STREAM targets at a time: the first part's predictions reach Label Studio before the last part is
    computed (that part waits for an update; pushing everything at the end would time it out), and a
    correction arriving between two parts stops the round: the job computes again with it."""
    import cosod.propagate as cp

    model, ls, s, version = env()
    monkeypatch.setattr(propagation, "STREAM", 1)
    real = cp.propagate
    parts: list[list[int]] = []
    waited: list[bool] = []

    def watched(*a: Any, **kw: Any) -> Any:
        parts.append(list(kw["targets"]))
        if len(parts) == 3:  # the third part: an update must have arrived already
            deadline = time.monotonic() + 20
            while ls.calls.get("update", 0) + ls.calls.get("create", 0) == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            waited.append(ls.calls.get("update", 0) + ls.calls.get("create", 0) > 0)
        return real(*a, **kw)

    monkeypatch.setattr(cp, "propagate", watched)
    job = propagation_job_id(PID, GroupKey("field:group", "a"))
    model.fit("ANNOTATION_CREATED", event(ls, 1, truth(0, 0)))
    r = wait_done(s, job).result
    assert waited == [True]
    assert len(parts) == 5 and all(len(p) == 1 for p in parts)  # tasks 2-6, one at a time
    assert r["updated"] == [2, 3, 4, 5] and r["created"] == [6] and r["rounds"] == 1
    assert ls.calls["states"] == 5  # annotated or not: asked again right before each part's push

    # a correction between two parts: the rest of the round is dropped and the job computes again
    parts.clear()

    def interrupted(*a: Any, **kw: Any) -> Any:
        parts.append(list(kw["targets"]))
        if len(parts) == 2:
            model.fit("ANNOTATION_CREATED", event(ls, 4, truth(0, 3)))
        return real(*a, **kw)

    monkeypatch.setattr(cp, "propagate", interrupted)
    model.fit("ANNOTATION_CREATED", event(ls, 2, truth(0, 1)))
    r2 = wait_done(s, job).result
    assert r2["rounds"] == 2 and r2["corrected_tasks"] == [1, 2, 4]
    assert r2["updated"] == [3, 5, 6]
    # local indices of the group's images: round 1 (corrected 1, 2) computed tasks 3 and 4, the second not
    # pushed; round 2 (corrected 1, 2, 4) tasks 3, 5 and 6. The correction also queued the follow-up job.
    assert parts[:5] == [[2], [3], [3], [4], [5]]
    assert wait_done(s, f"{job}-again").result["updated"] == [3, 5, 6]


def test_the_latest_exemplars_only(env, monkeypatch) -> None:
    """However many tasks of a group are annotated, a job reads at most MAX_EXEMPLAR_IMAGES exemplar images:
    the most recently stored corrections."""
    model, ls, s, _ = env()
    monkeypatch.setattr(propagation, "MAX_EXEMPLAR_IMAGES", 2)
    job = propagation_job_id(PID, GroupKey("field:group", "a"))
    for t in (1, 2, 3):
        model.fit("ANNOTATION_CREATED", event(ls, t, truth(0, t - 1)))
        wait_done(s, job)
    before = ls.calls["image"]
    model.fit("ANNOTATION_UPDATED", event(ls, 2, truth(0, 1), aid=2002, when="2026-12-07T06:00:00Z"))
    r = wait_done(s, job).result
    # stored last: task 2 (updated), then task 3; task 1's correction is left out, its task is annotated
    assert r["corrected_tasks"] == [2, 3] and r["corrections"] == 2
    assert r["updated"] == [4, 5, 6] and r["created"] == []  # task 6's prediction: created by a first job
    assert ls.calls["image"] - before == 5  # the 2 exemplars and the 3 targets: never task 1's image
