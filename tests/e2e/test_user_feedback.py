"""What a Label Studio 1.23.2 user sees: a backend without LABEL_STUDIO_API_KEY is refused by the connect
dialog with the backend's reason, and the Data Manager's "Prediction score" column (predictions_score)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from backend.api.health import status_line

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def connect(ls: Any, backend_url: str, project: int, title: str = "cosod") -> requests.Response:
    """``POST /api/ml`` as the Model > Connect model dialog sends it; the raw answer."""
    return requests.post(
        f"{ls.url}/api/ml",
        headers={"Authorization": f"Token {ls.token}"},
        json={"url": backend_url, "project": project, "title": title, "is_interactive": True},
        timeout=60,
    )


def strings(value: Any) -> str:
    """Every string in a JSON answer, joined (Label Studio nests its validation messages)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    return " | ".join(strings(v) for v in value) if isinstance(value, list) else ""


def test_without_an_api_key_health_and_label_studio_name_it(
    label_studio, start_backend, e2e, tmp_path
) -> None:
    ls = label_studio
    with start_backend(ls.url, "", tmp_path / "nokey", loaded_only=True) as backend:
        health = requests.get(f"{backend.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "NOT_CONFIGURED"
        assert health.json()["missing"] == ["LABEL_STUDIO_API_KEY"]
        assert health.reason.startswith("LABEL_STUDIO_API_KEY not set on the ML backend")
        project, _ = e2e.create_grouped_project(ls, {"a": 2}, title="no key")
        refused = connect(ls, backend.url, project)
        # Label Studio refuses the connection (400) and its message carries the backend's reason
        assert refused.status_code == 400, refused.text
        text = strings(refused.json())
        assert "health check failed" in text
        assert "503 Server Error: LABEL_STUDIO_API_KEY not set on the ML backend" in text
        assert "Account & Settings" in text
        assert e2e.ls_api(ls, "GET", f"/api/ml?project={project}") == []  # nothing stored


def test_a_setup_error_reaches_the_connect_dialog(label_studio, backend, e2e) -> None:
    ls = label_studio
    rect = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image">'
        '<Label value="A"/></RectangleLabels></View>'
    )
    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": "rect", "label_config": rect})["id"]
    refused = connect(ls, backend.url, project)
    assert refused.status_code == 400, refused.text
    text = strings(refused.json())
    ours = requests.post(
        f"{backend.url}/setup", json={"project": f"{project}.1795340308", "schema": rect}, timeout=10
    )
    assert 400 <= ours.status_code < 500
    reason = status_line(ours.status_code, ours.json()["error"]).split(" ", 1)[1]
    assert "doesn't look like a valid ML backend" in text
    assert f"Reason: {ours.status_code} Client Error: {reason} for url: {backend.url}/setup" in text, text


def tasks_by_score(ls: Any, e2e: Any, project: int, ordering: str | None = None, **query: Any) -> list[Any]:
    """The Data Manager's task list (every column computed: ``fields=all``), ordered by ``ordering``."""
    if ordering:
        query["ordering"] = [ordering]
    params = {"project": project, "fields": "all", "page_size": 100}
    if query:
        params["query"] = json.dumps(query)
    return e2e.ls_api(ls, "GET", "/api/tasks", params=params)["tasks"]


def test_the_prediction_score_column(label_studio, backend, e2e) -> None:
    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"a": 3, "b": 3}, title="scores")
    ml = connect(ls, backend.url, project, title="cosod model")
    assert ml.status_code == 201, ml.text
    version = ml.json()["model_version"]
    e2e.retrieve_predictions(ls, project)
    preds = e2e.predictions_by_task(ls, project)
    assert set(preds) == set(task_group)
    score = {t: p[0]["score"] for t, p in preds.items()}
    assert all(len(p) == 1 and p[0]["model_version"] == version for p in preds.values())
    assert all(isinstance(s, float) for s in score.values())

    # Connecting made the model's title the project's model_version ("Use predictions to prelabel tasks");
    # the column averages only the predictions of that version: none, so it is empty.
    assert e2e.ls_api(ls, "GET", f"/api/projects/{project}")["model_version"] == "cosod model"
    assert {t["id"]: t["predictions_score"] for t in tasks_by_score(ls, e2e, project)} == dict.fromkeys(
        task_group
    )

    # Settings > Annotation > Prelabeling: select the version the predictions carry -> the column shows them
    e2e.ls_api(ls, "PATCH", f"/api/projects/{project}", json={"model_version": version})
    listed = {t["id"]: t["predictions_score"] for t in tasks_by_score(ls, e2e, project)}
    assert listed == pytest.approx(score)

    # sort by the model's confidence, both ways, and filter on it
    down = [t["id"] for t in tasks_by_score(ls, e2e, project, "-tasks:predictions_score")]
    up = [t["id"] for t in tasks_by_score(ls, e2e, project, "tasks:predictions_score")]
    assert [score[i] for i in down] == sorted(score.values(), reverse=True)
    assert [score[i] for i in up] == sorted(score.values())
    cut = sorted(score.values())[2]
    above = {"conjunction": "and", "items": [_greater(cut)]}
    kept = {t["id"] for t in tasks_by_score(ls, e2e, project, filters=above)}
    assert kept == {i for i, s in score.items() if s > cut} and 0 < len(kept) < len(score)


def _greater(value: float) -> dict[str, Any]:
    return {
        "filter": "filter:tasks:predictions_score",
        "operator": "greater",
        "type": "Number",
        "value": value,
    }
