""" "Start Training" against a real Label Studio 1.23.2: what Label Studio does with the backend's answer.

Label Studio's train view (``label_studio/ml/api.py``, ``MLBackendTrainAPI.post``) calls
``MLBackend.train()`` and answers ``200`` with an empty body whatever the backend said, so its "Start Model
Training" dialog always shows ``Response: {}`` (the page prints ``response.response || {}``). What it keeps
of the backend's answer is its ``job`` key: ``MLBackend.train()`` (``label_studio/ml/models.py``) stores it
as an ``MLBackendTrainJob`` row. This test pins both facts and checks that the backend's answer, its log
and ``GET /jobs`` say what happened: no job while the project has fewer than COSOD_FINETUNE_MIN_CORRECTIONS
corrections (and why), then the fine-tune's job id.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from backend.labelstudio.regions import brush_region
from backend.learning.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def train_jobs(label_studio: Any, ml_id: int) -> list[str]:
    """The job ids Label Studio recorded for an ML backend (its own SQLite database)."""
    db = Path(label_studio.log).parent / "ls-data" / "label_studio.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT job_id FROM ml_mlbackendtrainjob WHERE ml_backend_id = ? ORDER BY id", (ml_id,)
        ).fetchall()
    return [r[0] for r in rows]


def press_train(label_studio: Any, ml_id: int) -> requests.Response:
    """What the "Start Training" button sends: ``POST /api/ml/<id>/train``."""
    return requests.post(
        f"{label_studio.url}/api/ml/{ml_id}/train",
        headers={"Authorization": f"Token {label_studio.token}"},
        json={},
        timeout=120,
    )


def test_start_training_says_why_no_job_or_which_job(
    label_studio: Any, start_backend: Any, tmp_path_factory: Any, e2e: Any
) -> None:
    base = tmp_path_factory.mktemp("train-feedback")
    empty, _ = e2e.create_grouped_project(
        label_studio, {"red": 2}, title="cosod train feedback, no corrections"
    )
    corrected, _ = e2e.create_grouped_project(
        label_studio, {"red": 2, "blue": 2}, title="cosod train feedback"
    )
    env = {"COSOD_TRAIN_EVERY": "1000", "COSOD_FINETUNE_STEPS": "5", "COSOD_CACHE_DIR": str(base / "feat")}
    with start_backend(label_studio.url, e2e.TOKEN, base, **env) as backend:
        ml = {p: e2e.connect_backend(label_studio, p, backend.url, title="m") for p in (empty, corrected)}

        # no correction: Label Studio answers 200 and an empty body; the backend says why and starts nothing
        r = press_train(label_studio, ml[empty]["id"])
        assert r.status_code == 200 and r.content == b"", (r.status_code, r.text[:300])
        line = start_training_line(backend.log, empty)
        assert (
            "'message': 'no fine-tune started: not enough corrections yet: 0 of 3 "
            "(COSOD_FINETUNE_MIN_CORRECTIONS); training starts once there are enough'" in line
        ), line
        assert "'job'" not in line
        assert train_jobs(label_studio, ml[empty]["id"]) == []
        assert requests.get(f"{backend.url}/jobs?project={empty}", timeout=30).json()["jobs"] == []

        # three corrections through Label Studio's own webhook, then the button
        tasks = e2e.ls_api(label_studio, "GET", f"/api/tasks?project={corrected}&page_size=100")["tasks"]
        for t in tasks[:3]:
            mask = np.zeros((48, 64), dtype=bool)
            mask[10:30, 20:40] = True
            region = brush_region(mask, from_name="tag", to_name="image", label="Object", score=1.0, rid="c")
            region.pop("score")
            e2e.ls_api(label_studio, "POST", f"/api/tasks/{t['id']}/annotations", json={"result": [region]})
        store = Store(base / "model")
        deadline = time.monotonic() + 30
        while store.count_corrections(corrected) < 3:
            assert time.monotonic() < deadline, f"{store.count_corrections(corrected)} corrections stored"
            time.sleep(0.2)
        listed = requests.get(f"{backend.url}/jobs?project={corrected}", timeout=30).json()["jobs"]
        assert [j for j in listed if j["id"].startswith("finetune-")] == []  # propagation only

        job_id = f"finetune-p{corrected}"
        r = press_train(label_studio, ml[corrected]["id"])
        assert r.status_code == 200 and r.content == b"", (r.status_code, r.text[:300])
        # Label Studio kept the answer's "job": the backend's job id
        assert train_jobs(label_studio, ml[corrected]["id"]) == [job_id]
        line = start_training_line(backend.log, corrected)
        assert f"'job': '{job_id}'" in line and "'finetune_new': True" in line, line
        assert f"'message': 'fine-tune {job_id} " in line and f"follow it: GET /jobs/{job_id}" in line, line
        info = requests.get(f"{backend.url}/jobs/{job_id}", timeout=30).json()
        assert info["id"] == job_id and info["project"] == corrected, info


def start_training_line(log: Path, project: int, timeout: float = 30.0) -> str:
    """The backend's log line of the START_TRAINING webhook of ``project`` (its whole answer)."""
    needle = f"webhook START_TRAINING project={project} task=None: {{"
    deadline = time.monotonic() + timeout
    while True:
        found = [x for x in log.read_text(errors="replace").splitlines() if needle in x]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, f"no START_TRAINING for project {project} in {log}"
        time.sleep(0.2)
