"""How a prelabel job talks to a real Label Studio 1.23.2: the group's tasks with the versions of their
predictions in one Data Manager request, the all-or-none bulk import, the re-check before an import, and the
one-by-one fallback when Label Studio refuses a batch."""

from __future__ import annotations

from typing import Any

import pytest

from backend.errors import LabelStudioError, LabelStudioUnavailableError
from backend.grouping import GroupKey, TaskRef
from backend.jobs.context import JobContext
from backend.jobs.prelabel import _predicted, _push
from backend.labelstudio import client as labelstudio
from backend.labelstudio.client import LabelStudioClient, TaskState
from backend.settings import Settings

pytestmark = [pytest.mark.e2e]

KEY = GroupKey("field:group", "a")


def settings(ls: Any, tmp_path: Any) -> Settings:
    return Settings(
        label_studio_url=ls.url, label_studio_api_key=ls.token, model_dir=str(tmp_path), job_attempts=1
    )


def context(client: LabelStudioClient) -> JobContext:
    """What ``_push`` and ``_predicted`` use of a job's context: the settings and the client."""
    return JobContext(client.settings, loader=None, ls=client, model=None)  # type: ignore[arg-type]


def predict(e2e: Any, ls: Any, task: int, version: str) -> None:
    e2e.ls_api(ls, "POST", "/api/predictions", json={"task": task, "result": [], "model_version": version})


def versions_of(e2e: Any, ls: Any, project: int) -> dict[int, list[str]]:
    by_task = e2e.predictions_by_task(ls, project)
    return {t: sorted(p["model_version"] for p in ps) for t, ps in by_task.items()}


def test_tasks_come_with_the_exact_versions_of_their_predictions(
    label_studio: Any, e2e: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"a": 5}, title="versions")
    t0, t1, t2, t3, t4 = sorted(task_group)
    predict(e2e, ls, t0, "scosparc-p1-aa")
    predict(e2e, ls, t1, "scosparc-p1-aa-v1")  # contains the other version: Label Studio's filter would match
    predict(e2e, ls, t2, "scosparc-p1-aa")
    predict(e2e, ls, t2, "ums-p1-bb")
    e2e.ls_api(ls, "DELETE", f"/api/tasks/{t4}")
    client = LabelStudioClient(settings(ls, tmp_path))
    for per_request in (200, 2):  # one request, then three
        monkeypatch.setattr(labelstudio, "IDS_PER_REQUEST", per_request)
        states = client.tasks_with_versions(project, [t4, t3, t2, t1, t0, t0])
        assert [s.task.id for s in states] == [t0, t1, t2, t3]  # sorted, once each, the deleted one left out
        assert [s.versions for s in states] == [
            {"scosparc-p1-aa"},
            {"scosparc-p1-aa-v1"},
            {"scosparc-p1-aa", "ums-p1-bb"},
            frozenset(),
        ]
        assert [s.has("scosparc-p1-aa") for s in states] == [True, False, True, False]
        data = states[0].task.data
        assert data["group"] == "a" and data["image"].startswith("/data/upload/")
    assert client.tasks_with_versions(project, []) == []


def test_a_cut_versions_column_is_resolved_task_by_task(label_studio: Any, e2e: Any, tmp_path: Any) -> None:
    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"a": 2}, title="many versions")
    crowded, plain = sorted(task_group)
    for i in range(30):  # 30 versions of 20 characters: more than the column's 500
        predict(e2e, ls, crowded, f"old-model-{i:03d}-xxxxx")
    predict(e2e, ls, crowded, "wanted")
    client = LabelStudioClient(settings(ls, tmp_path))
    states = client.tasks_with_versions(project, [crowded, plain])
    assert states[0].versions is None and states[1].versions == frozenset()
    ctx = context(client)
    assert _predicted(ctx, states, "wanted") == {crowded}
    assert _predicted(ctx, states, "old-model-029-xxxxx") == {crowded}
    assert _predicted(ctx, states, "absent") == set()


def test_an_import_is_stored_all_or_none(label_studio: Any, e2e: Any, tmp_path: Any) -> None:
    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"a": 2}, title="import")
    other, other_tasks = e2e.create_grouped_project(ls, {"b": 1}, title="import elsewhere")
    t0, t1 = sorted(task_group)
    client = LabelStudioClient(settings(ls, tmp_path))
    good = {"task": t0, "result": [], "score": 0.5, "model_version": "m"}
    refused = f"importing 2 predictions into project {project}.*400"
    with pytest.raises(LabelStudioError, match=refused) as info:
        client.import_predictions(project, [good, {**good, "task": next(iter(other_tasks))}])
    assert not isinstance(info.value, LabelStudioUnavailableError)
    assert versions_of(e2e, ls, project) == {}  # nothing of the refused batch was stored
    assert client.import_predictions(project, [good, {**good, "task": t1, "score": 0.25}]) == 2
    assert versions_of(e2e, ls, project) == {t0: ["m"], t1: ["m"]}
    assert client.import_predictions(project, []) == 0
    assert versions_of(e2e, ls, other) == {}


def test_the_push_checks_again_and_skips_what_is_there_by_now(
    label_studio: Any, e2e: Any, tmp_path: Any
) -> None:
    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"a": 4}, title="push")
    t0, t1, t2, gone = sorted(task_group)
    predict(e2e, ls, t0, "v")  # pushed meanwhile by another run
    e2e.ls_api(ls, "DELETE", f"/api/tasks/{gone}")  # deleted after the job listed it
    ctx = context(LabelStudioClient(settings(ls, tmp_path)))
    ready = {t: ([], 0.5) for t in (t0, t1, t2, gone)}
    sent, already, failed = _push(ctx, project, KEY, ready, "v")
    assert (sent, already) == ([t1, t2], [t0])
    assert failed == [{"task": gone, "error": "the task was deleted"}]
    assert versions_of(e2e, ls, project) == {t0: ["v"], t1: ["v"], t2: ["v"]}
    assert _push(ctx, project, KEY, ready, "v") == ([], [t0, t1, t2], failed)  # a re-run pushes nothing


class StaleList(LabelStudioClient):
    """A client whose task list still shows a task deleted a moment later (between the re-check and the
    import), so that Label Studio refuses the batch."""

    deleted: int = 0

    def tasks_with_versions(self, project_id: int, task_ids: Any) -> list[TaskState]:
        states = super().tasks_with_versions(project_id, task_ids)
        return sorted([*states, TaskState(TaskRef(self.deleted, {}), frozenset())], key=lambda s: s.task.id)


def test_a_refused_batch_is_pushed_task_by_task(label_studio: Any, e2e: Any, tmp_path: Any) -> None:
    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"a": 3}, title="refused batch")
    t0, t1, gone = sorted(task_group)
    predict(e2e, ls, t0, "v")
    e2e.ls_api(ls, "DELETE", f"/api/tasks/{gone}")
    client = StaleList(settings(ls, tmp_path))
    client.deleted = gone
    sent, already, failed = _push(context(client), project, KEY, {t: ([], 0.5) for t in (t0, t1, gone)}, "v")
    assert (sent, already) == ([t1], [t0])
    assert [f["task"] for f in failed] == [gone] and "HTTP 4" in failed[0]["error"], failed
    assert versions_of(e2e, ls, project) == {t0: ["v"], t1: ["v"]}
