"""Groups without scripts, against a real Label Studio 1.23.2: tasks uploaded in the UI's way (no ``group``
field), grouped by ``filename:<regex>`` or ``similar`` from the ML connection's extra params."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import requests

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def upload(e2e: Any, ls: Any, project: int, names: list[tuple[str, int, int]]) -> dict[int, str]:
    """Upload PNGs (file name, object kind, seed) as Label Studio's UI does: one task per file, only
    ``data.image``. Returns task id -> file name as uploaded."""
    files = {
        f"f{i}": (name, e2e.group_png(kind, seed), "image/png") for i, (name, kind, seed) in enumerate(names)
    }
    imported = e2e.ls_api(ls, "POST", f"/api/projects/{project}/import", files=files)
    assert imported["task_count"] == len(names), imported
    tasks = e2e.ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=1000")["tasks"]
    out = {}
    for t in tasks:
        assert set(t["data"]) == {"image"}, t["data"]  # no group field: nothing added by a script
        assert re.fullmatch(rf"/data/upload/{project}/[0-9a-f]{{8}}-.+\.png", t["data"]["image"]), t["data"]
        out[t["id"]] = t["data"]["image"]
    return out


def connect(e2e: Any, ls: Any, backend: Any, project: int, group_by: str) -> dict[str, Any]:
    return dict(
        e2e.connect_backend(
            ls, project, backend.url, is_interactive=False, extra_params={"group_by": group_by}
        )
    )


def retrieve(e2e: Any, ls: Any, project: int) -> None:
    e2e.retrieve_predictions(ls, project)


def groups_of(backend: Any, project: int) -> dict[str | None, int]:
    resp = requests.get(f"{backend.url}/jobs/coverage", params={"project": project}, timeout=60)
    assert resp.status_code == 200, resp.text
    return {g["group"]: g["tasks"] for g in resp.json()["groups"]}


def one_prediction_each(e2e: Any, ls: Any, project: int, tasks: dict[int, str], version: str) -> None:
    by_task = e2e.predictions_by_task(ls, project)
    assert sorted(by_task) == sorted(tasks), by_task.keys()
    for preds in by_task.values():
        assert len(preds) == 1 and preds[0]["model_version"] == version
        assert preds[0]["result"] and preds[0]["result"][0]["type"] == "brushlabels"


@pytest.fixture(scope="module")
def grouping_backend(label_studio: Any, start_backend: Any, e2e: Any, tmp_path_factory: Any) -> Any:
    """A backend of this module's own, with a feature cache (as ``make run`` and compose set one)."""
    base = tmp_path_factory.mktemp("grouping-backend")
    with start_backend(label_studio.url, e2e.TOKEN, base, COSOD_CACHE_DIR=str(base / "features")) as server:
        server.model_dir = base / "model"
        server.cache_dir = base / "features"
        yield server


def test_groups_from_file_names(label_studio: Any, grouping_backend: Any, e2e: Any) -> None:
    ls, backend = label_studio, grouping_backend
    config = (REPO / "label_config" / "brush_grouped.xml").read_text()
    assert "$group" not in config  # the grouped config never shows "Group: undefined"
    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": "by name", "label_config": config})["id"]
    names = [(f"{kind}_{k}.png", g, k) for g, kind in enumerate(["mug", "shoe"]) for k in range(4)]
    names.append(("notes.png", 2, 0))  # no match: the group of tasks without a name
    tasks = upload(e2e, ls, project, names)
    ml = connect(e2e, ls, backend, project, r"filename:^([a-z]+)_\d+\.png$")
    assert groups_of(backend, project) == {"mug": 4, "shoe": 4, None: 1}
    retrieve(e2e, ls, project)
    one_prediction_each(e2e, ls, project, tasks, ml["model_version"])


def test_a_bad_rule_in_extra_params_is_refused_with_its_reason(
    label_studio: Any, grouping_backend: Any, e2e: Any
) -> None:
    """Label Studio's connect dialog shows the backend's reason (carried in the HTTP reason phrase), not
    only its generic "400 Client Error"."""
    ls = label_studio
    config = (REPO / "label_config" / "brush.xml").read_text()
    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": "bad rule", "label_config": config})[
        "id"
    ]
    refused = requests.post(
        f"{ls.url}/api/ml",
        headers={"Authorization": f"Token {ls.token}"},
        json={
            "url": grouping_backend.url,
            "project": project,
            "title": "cosod",
            "extra_params": {"group_by": "bogus"},
        },
        timeout=120,
    )
    assert refused.status_code == 400, refused.text
    assert "COSOD_GROUP_BY" not in refused.text and "group_by must be" in refused.text, refused.text
    resp = requests.post(
        f"{grouping_backend.url}/setup",
        json={
            "project": "999.1795340308",
            "schema": (REPO / "label_config" / "brush.xml").read_text(),
            "extra_params": {"group_by": "filename:mug_\\d+"},
        },
        timeout=30,
    )
    assert resp.status_code == 400 and "capture group" in resp.json()["error"], resp.text


def test_groups_from_the_images_themselves(label_studio: Any, grouping_backend: Any, e2e: Any) -> None:
    """Three objects, four images each, uploaded in a shuffled order under meaningless names; then two more
    images: each joins its object's group, and no task changes group. The threshold 0.99 is the tiny random
    backbone's (its descriptors of one object agree to > 0.995, of two objects to < 0.98)."""
    from backend.grouping.similar import SimilarGroups

    ls, backend = label_studio, grouping_backend
    config = (REPO / "label_config" / "brush.xml").read_text()
    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": "similar", "label_config": config})["id"]
    objects = [(kind, seed) for kind in range(3) for seed in range(4)]
    random.Random(5).shuffle(objects)
    names = [(f"IMG_{100 + i}.png", kind, seed) for i, (kind, seed) in enumerate(objects)]
    tasks = upload(e2e, ls, project, names)
    kind_of = {tid: next(k for n, k, _ in names if url.endswith("-" + n)) for tid, url in tasks.items()}
    ml = connect(e2e, ls, backend, project, "similar:0.99")
    retrieve(e2e, ls, project)
    one_prediction_each(e2e, ls, project, tasks, ml["model_version"])
    assert sorted(groups_of(backend, project).values()) == [4, 4, 4]
    first = SimilarGroups(backend.model_dir).lookup(project)
    assert sorted(first) == sorted(tasks)
    assert len({(first[t], kind_of[t]) for t in first}) == 3  # one group per object, one object per group
    # the grouping pass's features served the predictions: one cache entry per image, no more
    assert len(list(Path(backend.cache_dir).rglob("*.npz"))) == 12

    more = [("IMG_900.png", 0, 9), ("IMG_901.png", 2, 9)]
    after_upload = upload(e2e, ls, project, more)
    new = {tid: url for tid, url in after_upload.items() if tid not in tasks}
    kind_of.update({tid: next(k for n, k, _ in more if url.endswith("-" + n)) for tid, url in new.items()})
    retrieve(e2e, ls, project)
    after = SimilarGroups(backend.model_dir).lookup(project)
    assert {t: after[t] for t in first} == first  # nothing moved, no id changed
    group_of_kind = {kind_of[t]: g for t, g in first.items()}
    assert all(after[t] == group_of_kind[kind_of[t]] for t in new), (after, kind_of)
    one_prediction_each(e2e, ls, project, after_upload, ml["model_version"])
    assert sorted(groups_of(backend, project).values()) == [4, 5, 5]
