"""Images without the common object, end to end against a real Label Studio 1.23.2: label_config/
brush_absence.xml passes Label Studio's validation, a project connected with extra params
``{"absence": true}`` gets predictions where the images without the object carry the "No common object"
choice, no mask and score 0.0 (the others their mask), all valid for Label Studio's SDK, from "Retrieve
predictions" and from the pre-annotation job alike; a person's
annotation with the choice (alone, or over a brush stroke) is stored as an empty correction; a non-boolean
``absence`` is refused at the connection with its reason.

Known answer: the backend serves tests/planted.py's pipeline (the tiny pipeline on planted features, looked
up by image hash) for a planted group of 10 images where images 2 and 7 lack the object; the PNGs uploaded
are exactly those images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.regions import brush_region, rle_to_mask_fast
from backend.learning.store import Store
from tests.planted import planted_group, png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "label_config" / "brush_absence.xml").read_text()
N, SEED, ABSENT = 10, 5, (2, 7)
EXTRA = {"absence": True, "group_by": "project", "propagate": False}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def upload(e2e: Any, ls: Any, images: list[np.ndarray], title: str) -> tuple[int, dict[int, int]]:
    """A project with the absence config and the planted images; returns its id and task id -> image index."""
    project = e2e.ls_api(ls, "POST", "/api/projects", json={"title": title, "label_config": CONFIG})["id"]
    files = {f"f{k}": (f"planted_{k}.png", png(im), "image/png") for k, im in enumerate(images)}
    assert e2e.ls_api(ls, "POST", f"/api/projects/{project}/import", files=files)["task_count"] == N
    tasks = e2e.ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    return project, {t["id"]: int(t["data"]["image"].rsplit("_", 1)[1][:-4]) for t in tasks}


def check(
    stored: dict[int, list[dict[str, Any]]], k_of: dict[int, int], version: str, obj: list[Any]
) -> None:
    """One prediction per task, of ``version``, valid for the SDK; the absent images carry the choice, no
    mask and score 0.0, the others their mask."""
    assert sorted(stored) == sorted(k_of) and all(len(v) == 1 for v in stored.values())
    li = LabelInterface(CONFIG)
    flagged = []
    for tid, (pred,) in stored.items():
        k = k_of[tid]
        assert pred["model_version"] == version
        assert li.validate_prediction(pred, return_errors=True) == [], pred
        kinds = [r["type"] for r in pred["result"]]
        if kinds == ["choices"]:
            flagged.append(k)
            (region,) = pred["result"]
            assert (region["from_name"], region["to_name"]) == ("absence", "image")
            assert region["value"] == {"choices": ["No common object"]} and pred["score"] == 0.0
        else:
            assert kinds == ["brushlabels"], (k, kinds)
            (region,) = pred["result"]
            mask = rle_to_mask_fast(
                region["value"]["rle"], region["original_height"], region["original_width"]
            )
            assert iou(mask > 0, obj[k]) > 0.8 and pred["score"] > 0.3, k
    assert sorted(flagged) == list(ABSENT)


def test_absent_images_get_the_choice_and_the_choice_is_an_empty_correction(
    label_studio: Any, start_backend: Any, tmp_path_factory: pytest.TempPathFactory, e2e: Any
) -> None:
    ls = label_studio
    ok = requests.post(f"{ls.url}/api/projects/validate/", json={"label_config": CONFIG}, timeout=30)
    assert ok.status_code == 204, ok.text
    _, images, obj = planted_group(N, ABSENT, SEED)
    project, k_of = upload(e2e, ls, images, "cosod absence")

    base = tmp_path_factory.mktemp("absence")
    env = {"COSOD_TEST_PLANTED": f"{N}:{SEED}:{','.join(map(str, ABSENT))}"}
    with start_backend(ls.url, e2e.TOKEN, base, app="tests.planted:create_app()", **env) as backend:
        # a non-boolean setting is refused with its reason at the connection
        refused = requests.post(
            f"{ls.url}/api/ml",
            headers={"Authorization": f"Token {ls.token}"},
            json={"url": backend.url, "project": project, "title": "bad", "extra_params": {"absence": "yes"}},
            timeout=120,
        )
        assert refused.status_code == 400 and "absence must be true or false" in refused.text, refused.text
        ml = e2e.connect_backend(ls, project, backend.url, extra_params=EXTRA)
        version = ml["model_version"]
        assert version.startswith(f"scosparc-p{project}-") and version.endswith("-absence")
        e2e.retrieve_predictions(ls, project)
        check(e2e.predictions_by_task(ls, project), k_of, version, obj)

        # a person confirms an absent image with the choice alone, and marks a present one with the
        # choice over a brush stroke: both are stored as "no common object here"
        by_k = {k: tid for tid, k in k_of.items()}
        choice = {
            "id": "c1",
            "type": "choices",
            "from_name": "absence",
            "to_name": "image",
            "origin": "manual",
            "value": {"choices": ["No common object"]},
        }
        brush = brush_region(obj[0], from_name="tag", to_name="image", label="Object", score=1.0, rid="b1")
        brush.pop("score")
        first = e2e.ls_api(ls, "POST", f"/api/tasks/{by_k[2]}/annotations", json={"result": [choice]})
        second = e2e.ls_api(ls, "POST", f"/api/tasks/{by_k[0]}/annotations", json={"result": [brush, choice]})
        plain = e2e.ls_api(
            ls, "POST", f"/api/tasks/{by_k[1]}/annotations", json={"result": [{**brush, "id": "b2"}]}
        )
        store = Store(base / "model")
        deadline = time.monotonic() + 30
        while store.count_corrections(project) < 3:
            assert time.monotonic() < deadline, "the annotations were not stored as corrections within 30 s"
            time.sleep(0.2)
        rows = {c.annotation_id: c for c in store.load_corrections(project)[0]}
        assert rows[first["id"]].mask is None and rows[first["id"]].empty
        assert rows[second["id"]].mask is None and rows[second["id"]].empty
        assert rows[plain["id"]].mask is not None and rows[plain["id"]].mask.sum() == obj[0].sum()

        # the pre-annotation job (POST /jobs/prelabel, in-process queue) of another project does the same
        other, k_other = upload(e2e, ls, images, "cosod absence prelabel")
        ml = e2e.connect_backend(ls, other, backend.url, extra_params=EXTRA)
        r = requests.post(f"{backend.url}/jobs/prelabel", json={"project": other}, timeout=60)
        assert r.status_code == 202, r.text
        (job,) = r.json()["jobs"]
        assert job.endswith(ml["model_version"]) and ml["model_version"].endswith("-absence")
        deadline = time.monotonic() + 120
        while (info := requests.get(f"{backend.url}/jobs/{job}", timeout=10).json())["status"] not in (
            "finished",
            "failed",
        ):
            assert time.monotonic() < deadline, info
            time.sleep(0.2)
        assert info["status"] == "finished" and info["result"]["pushed"] == N, info
        check(e2e.predictions_by_task(ls, other), k_other, ml["model_version"], obj)
