"""End to end against a real Label Studio 1.23.2: grouped images, ML connection, predictions, webhook."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SIZES = [(96, 72), (80, 80), (112, 64), (64, 96)]  # (width, height) per image within a group


def make_group_image(group: int, k: int) -> tuple[bytes, tuple[int, int]]:
    """A noisy background with the group's common object (red disk / blue square) at a random place."""
    rng = np.random.default_rng(1000 * group + k)
    w, h = SIZES[k % len(SIZES)]
    img = (rng.random((h, w, 3)) * 80 + 90).astype(np.uint8)
    r = int(min(w, h) * rng.uniform(0.18, 0.28))
    cy, cx = int(rng.integers(r + 2, h - r - 2)), int(rng.integers(r + 2, w - r - 2))
    yy, xx = np.mgrid[:h, :w]
    if group == 0:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (220, 20, 30)
    else:
        img[max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + r] = (20, 40, 220)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue(), (w, h)


def api(ls: Any, method: str, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Token {ls.token}"}
    resp = requests.request(method, f"{ls.url}{path}", headers=headers, timeout=120, **kw)
    assert resp.status_code < 400, f"{method} {path} -> {resp.status_code}: {resp.text[:500]}"
    return resp.json() if resp.content else None


def predictions(ls: Any, project: int) -> list[dict[str, Any]]:
    return api(ls, "GET", f"/api/predictions?project={project}")


def metric(backend: Any, name: str) -> float:
    text = requests.get(f"{backend.url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_grouped_predictions_through_label_studio(label_studio: Any, backend: Any) -> None:
    ls = label_studio
    config = (REPO / "label_config" / "brush_grouped.xml").read_text()
    project = api(ls, "POST", "/api/projects", json={"title": "cosod e2e", "label_config": config})["id"]

    # 2 groups x 4 images; multipart upload needs one distinct field name per file
    groups = {"apples": 0, "cubes": 1}
    files, sizes = {}, {}
    for name, g in groups.items():
        for k in range(4):
            data, size = make_group_image(g, k)
            fname = f"{name}_{k}.png"
            files[f"f{len(files)}"] = (fname, data, "image/png")
            sizes[fname] = size
    imported = api(ls, "POST", f"/api/projects/{project}/import", files=files)
    assert imported["task_count"] == 8
    tasks = api(ls, "GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    assert len(tasks) == 8
    task_size, task_group = {}, {}
    for t in tasks:  # give each task its group field (the upload only sets data.image)
        fname = next(f for f in sizes if t["data"]["image"].endswith(f))
        group = fname.split("_")[0]
        api(ls, "PATCH", f"/api/tasks/{t['id']}", json={"data": {**t["data"], "group": group}})
        task_size[t["id"]], task_group[t["id"]] = sizes[fname], group

    # connect the backend: LS calls /health and /setup and stores the version /setup returned
    ml = api(
        ls,
        "POST",
        "/api/ml",
        json={"url": backend.url, "project": project, "title": "cosod", "is_interactive": True},
    )
    assert ml["state"] == "CO", ml
    version = ml["model_version"]
    assert re.fullmatch(rf"scosparc-p{project}-[0-9a-f]{{8}}", version), version
    setup = requests.post(
        f"{backend.url}/setup", json={"project": f"{project}.1795340308", "schema": config}, timeout=10
    )
    assert setup.json()["model_version"] == version
    hooks = api(ls, "GET", f"/api/webhooks?project={project}")
    assert any(h["url"] == f"{backend.url}/webhook" for h in hooks), hooks

    # opening a task without predictions predicts it, from its whole group (4 images in one computation)
    opened = min(t for t in task_group if task_group[t] == "cubes")
    # the session's backend may have served other modules' projects: count from here
    images0 = metric(backend, "cosod_group_images_total")
    misses0 = metric(backend, "cosod_group_cache_misses_total")
    hits0 = metric(backend, "cosod_group_cache_hits_total")
    created0 = metric(backend, 'cosod_webhook_events_total{action="ANNOTATION_CREATED"}')
    task = api(ls, "GET", f"/api/tasks/{opened}")
    preds = [p for p in predictions(ls, project) if p["task"] == opened]
    assert len(preds) == 1 and preds[0]["model_version"] == version, preds
    assert task["id"] == opened
    assert metric(backend, "cosod_group_images_total") - images0 == 4
    assert metric(backend, "cosod_group_cache_misses_total") - misses0 == 1

    # "Retrieve predictions" on all tasks: one prediction per task, the opened one is not predicted again
    t0 = time.perf_counter()
    done = api(
        ls,
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    retrieve_s = time.perf_counter() - t0
    assert done is not None
    preds = predictions(ls, project)
    by_task: dict[int, list[dict[str, Any]]] = {}
    for p in preds:
        by_task.setdefault(p["task"], []).append(p)
    assert sorted(by_task) == sorted(task_size) and all(len(v) == 1 for v in by_task.values()), by_task.keys()
    for tid, (p,) in by_task.items():
        assert p["model_version"] == version
        assert 0.0 <= p["score"] <= 1.0
        (region,) = p["result"]
        w, h = task_size[tid]
        assert (region["original_width"], region["original_height"]) == (w, h)
        assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Object"]
        flat = np.asarray(decode_rle(region["value"]["rle"]))
        assert flat.size == w * h * 4
        mask = flat.reshape(h, w, 4)[:, :, 3]
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
    assert (
        metric(backend, "cosod_group_images_total") - images0 == 8
    )  # the apples group once; cubes came from the cache
    assert metric(backend, "cosod_group_cache_hits_total") - hits0 >= 1

    # a second retrieve adds nothing: the versions of /setup and of the predictions agree
    api(
        ls,
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert len(predictions(ls, project)) == 8

    versions = api(ls, "GET", f"/api/ml/{ml['id']}/versions")
    assert version in versions["versions"], versions

    # an annotation reaches /webhook
    p = by_task[opened][0]
    api(
        ls,
        "POST",
        f"/api/tasks/{opened}/annotations",
        json={"result": p["result"], "parent_prediction": p["id"]},
    )
    deadline = time.monotonic() + 10
    while metric(backend, 'cosod_webhook_events_total{action="ANNOTATION_CREATED"}') - created0 < 1:
        assert time.monotonic() < deadline, "no ANNOTATION_CREATED reached the backend's /webhook in 10 s"
        time.sleep(0.2)
    log_text = Path(backend.log).read_text(errors="replace")
    assert "webhook ANNOTATION_CREATED" in log_text and "Traceback" not in log_text
    assert retrieve_s < 60, f"retrieving 8 predictions took {retrieve_s:.1f} s"
