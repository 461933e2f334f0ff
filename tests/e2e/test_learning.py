"""Learning from corrections against a real Label Studio: predictions, people's corrections (annotations),
the Train button, a fine-tune that beats the active version on held-out corrections, promotion, and a new
"Retrieve predictions" that adds exactly one prediction of the new version per task and nothing more."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from backend.labelstudio.regions import brush_region
from backend.learning.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

COLOURS = [(220, 20, 30), (20, 40, 220), (30, 200, 40), (220, 200, 20)]  # group_png's common objects


def true_mask(e2e_png: bytes, group: int) -> np.ndarray:
    img = np.asarray(Image.open(io.BytesIO(e2e_png)).convert("RGB"))
    return np.all(img == np.asarray(COLOURS[group % 4], dtype=np.uint8), axis=2)


def retrieve(e2e: Any, ls: Any, project: int) -> None:
    e2e.retrieve_predictions(ls, project)


def versions_per_task(e2e: Any, ls: Any, project: int) -> dict[int, list[str]]:
    return {
        t: sorted(p["model_version"] for p in ps) for t, ps in e2e.predictions_by_task(ls, project).items()
    }


def test_annotate_finetune_promote_retrieve(label_studio, start_backend, tmp_path_factory, e2e) -> None:
    from tests.e2e.conftest import group_png

    base = tmp_path_factory.mktemp("learning")
    groups = {"red": 5, "blue": 5, "green": 5}
    project, task_group = e2e.create_grouped_project(label_studio, groups, title="cosod learning")
    # 0.3 of the 15 corrected images are held out: 7 of them (by their hashes), over the default minimum of
    # 5 images a promotion needs (0.2 would hold out 3, and the candidate would be kept, not promoted)
    env = {
        "COSOD_TRAIN_EVERY": "1000",
        "COSOD_HELDOUT_FRACTION": "0.3",
        "COSOD_FINETUNE_STEPS": "150",
        "COSOD_CACHE_DIR": str(base / "features"),
    }
    with start_backend(label_studio.url, e2e.TOKEN, base, **env) as backend:
        ml = e2e.connect_backend(label_studio, project, backend.url, is_interactive=True)
        retrieve(e2e, label_studio, project)
        first = versions_per_task(e2e, label_studio, project)
        (v0,) = {v for vs in first.values() for v in vs}
        assert all(vs == [v0] for vs in first.values()) and len(first) == 15

        # people correct every task: the annotation is the true mask of the group's object
        tasks = e2e.ls_api(label_studio, "GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
        for t in tasks:
            name = t["data"]["image"].rsplit("-", 1)[1]  # "<group>_<k>.png"
            group_name, k = name[:-4].rsplit("_", 1)
            g = list(groups).index(group_name)
            mask = true_mask(group_png(g, int(k)), g)
            region = brush_region(mask, from_name="tag", to_name="image", label="Object", score=1.0, rid="c")
            region.pop("score")
            e2e.ls_api(label_studio, "POST", f"/api/tasks/{t['id']}/annotations", json={"result": [region]})
        store = Store(base / "model")
        deadline = time.monotonic() + 30
        while store.count_corrections(project) < 15:
            assert time.monotonic() < deadline, f"{store.count_corrections(project)} corrections stored"
            time.sleep(0.2)

        # the Train button sends START_TRAINING; the fine-tune runs in the backend's queue
        e2e.ls_api(label_studio, "POST", f"/api/ml/{ml['id']}/train", json={})
        deadline = time.monotonic() + 600
        while True:
            info = requests.get(f"{backend.url}/versions?project={project}", timeout=10).json()["projects"][0]
            if info["versions"] and any(r["status"] != "base" for r in info["versions"]):
                break
            assert time.monotonic() < deadline, f"no fine-tuned version after 600 s: {info}"
            time.sleep(1.0)
        candidate = next(r for r in info["versions"] if r["parent"] == v0)
        print(f"held-out before {candidate['active_scores']}, after {candidate['scores']}")
        print(candidate["decision"])
        assert candidate["scores"]["iou"] > candidate["active_scores"]["iou"]
        # promoted on evidence: 7 paired held-out images, the bootstrap's lower bound above the margin
        evidence = candidate["evidence"]
        assert evidence["n"] == 7 == len(candidate["heldout_ids"]) and evidence["promoted"]
        assert evidence["lower"] > evidence["rule"]["margin"] and candidate["decision"].startswith("promoted")
        assert sorted(i["image"][1] for i in evidence["images"]) == candidate["heldout_ids"]
        assert candidate["status"] == "active" and info["active"] == candidate["version"] != v0
        v1 = candidate["version"]
        assert v1 == f"scosparc-p{project}-v1"

        # /setup now reports the new version, so Label Studio predicts again, once, with it
        assert e2e.ls_api(label_studio, "GET", f"/api/ml/{ml['id']}")["model_version"] == v1
        retrieve(e2e, label_studio, project)
        retrieve(e2e, label_studio, project)
        after = versions_per_task(e2e, label_studio, project)
        assert all(vs == sorted([v0, v1]) for vs in after.values()), after
        metrics = requests.get(f"{backend.url}/metrics", timeout=10).text
        assert f'version="{v1}"' in metrics and "cosod_version_heldout_score" in metrics
