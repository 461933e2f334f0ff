"""Interactive calls against a real Label Studio 1.23.2: the backend connected with "Interactive
preannotations" on, a project with label_config/brush_interactive.xml (smart KeyPointLabels and
RectangleLabels), and Label Studio's own ``POST /api/ml/<id>/interactive-annotating`` called with a smart
keypoint exactly as its editor serializes one (``web/libs/editor/src/regions/KeyPointRegion.jsx``, posted
by ``web/apps/labelstudio/src/pages/DataManager/DataManager.jsx``). Label Studio forwards the context to
``/predict`` and answers ``{"data": results[0]}``: the returned brush region covers the clicked object, and
the group's other unannotated tasks' predictions are updated in place by the queued propagation, while no
annotation exists. A bad prompt comes back as Label Studio's ``{"errors": [...]}`` with the backend's
message. Prints the interactive round trip's seconds and the IoUs.

Known answer: on the tiny random backbone the unprompted pipeline misses each image's coloured square (IoU
about 0); the keypoint's mask covers its square, and the propagated masks cover theirs (IoU about 0.8)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from backend.grouping import GroupKey
from backend.jobs.propagation import propagation_job_id
from backend.labelstudio.regions import rle_to_mask_fast
from tests.e2e.test_propagation import finished, iou, mask_of, truth, wait_updated

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def smart_keypoint(mask: np.ndarray, *, positive: bool = True) -> dict[str, Any]:
    """A smart KeyPointLabels region at a pixel inside ``mask``, serialized as the editor does (percent
    coordinates; ``is_positive`` and ``value.labels`` because the region is dynamic)."""
    ys, xs = np.nonzero(mask)
    k = len(ys) // 2
    h, w = mask.shape
    return {
        "id": "Pz3vB0_kPq",
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "origin": "manual",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {
            "x": 100.0 * (xs[k] + 0.5) / w,
            "y": 100.0 * (ys[k] + 0.5) / h,
            "width": 0.6,
            "keypointlabels": ["Object"],
            "labels": ["Object"],
        },
    }


def test_a_smart_keypoint_segments_its_task_and_propagates_to_the_group(
    label_studio, start_backend, tmp_path, e2e
) -> None:
    from tests.e2e.conftest import REPO

    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"red": 6, "blue": 3}, title="cosod interactive")
    config = (REPO / "label_config" / "brush_interactive.xml").read_text()
    e2e.ls_api(ls, "PATCH", f"/api/projects/{project}", json={"label_config": config})
    tasks = e2e.ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    k_of = {t["id"]: int(t["data"]["image"].rsplit("_", 1)[1][:-4]) for t in tasks}
    red = sorted(t for t, g in task_group.items() if g == "red")
    blue = sorted(t for t, g in task_group.items() if g == "blue")
    with start_backend(ls.url, e2e.TOKEN, tmp_path, COSOD_CACHE_DIR=str(tmp_path / "features")) as backend:
        ml = e2e.connect_backend(ls, project, backend.url, is_interactive=True)
        e2e.retrieve_predictions(ls, project)
        first = e2e.predictions_by_task(ls, project)
        assert sorted(first) == sorted(task_group) and all(len(p) == 1 for p in first.values())
        (version,) = {p[0]["model_version"] for p in first.values()}
        assert max(iou(mask_of(first[t][0]), truth(0, k_of[t])) for t in red) < 0.3  # the unprompted miss

        # the editor's call: a smart keypoint on the red square of the first red task
        a = red[0]
        t0 = time.monotonic()
        answer = e2e.ls_api(
            ls,
            "POST",
            f"/api/ml/{ml['id']}/interactive-annotating",
            json={"task": a, "context": {"result": [smart_keypoint(truth(0, k_of[a]))]}},
        )
        seconds = time.monotonic() - t0
        assert "errors" not in answer, answer
        data = answer["data"]
        (region,) = data["result"]
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "tag", "image")
        assert region["value"]["brushlabels"] == ["Object"] and data["model_version"] == version
        h, w = region["original_height"], region["original_width"]
        got = rle_to_mask_fast(region["value"]["rle"], h, w) > 0
        own = iou(got, truth(0, k_of[a]))
        print(f"interactive round trip through Label Studio: {seconds:.2f} s; IoU of the answer {own:.2f}")
        assert own > 0.6 and 0 < data["score"] <= 1

        # the queued propagation updates the group's other tasks in place; nothing is annotated
        targets = red[1:]
        after, waited = wait_updated(e2e, ls, project, first, targets, t0)
        job = finished(backend.url, propagation_job_id(project, GroupKey("field:group", "red")))
        assert job["status"] == "finished", job
        r = job["result"]
        print(f"propagated from the prompt {waited:.2f} s after the call; job {r}")
        assert r["prompted_tasks"] == [a] and r["corrected_tasks"] == [] and r["updated"] == targets
        for t in [a, *blue]:  # the prompted task's stored prediction and the other group: untouched
            assert after[t][0]["updated_at"] == first[t][0]["updated_at"], t
        for t in task_group:
            assert [p["id"] for p in after[t]] == [p["id"] for p in first[t]], t
        ious = [iou(mask_of(after[t][0]), truth(0, k_of[t])) for t in targets]
        print(f"red IoU after one smart keypoint: {np.round(ious, 2).tolist()}")
        assert min(ious) > 0.5
        assert e2e.ls_api(ls, "GET", f"/api/tasks/{a}")["total_annotations"] == 0

        # a bad prompt: Label Studio relays the backend's 400 message as {"errors": [...]}
        bad = smart_keypoint(truth(0, k_of[a]))
        bad["value"]["x"] = 140
        answer = e2e.ls_api(
            ls,
            "POST",
            f"/api/ml/{ml['id']}/interactive-annotating",
            json={"task": a, "context": {"result": [bad]}},
        )
        print(f"a keypoint at x=140%: {answer}")
        assert "data" not in answer and "value.x must be a number in 0..100" in str(answer["errors"])
