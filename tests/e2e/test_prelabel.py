"""Batch pre-annotation end to end: a real Label Studio, the backend under gunicorn, and either two real
``cosod-worker`` processes on Redis (database 13) or the in-process queue; plus the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = (REPO / "label_config" / "brush_grouped.xml").read_text()


def wait_jobs(url: str, ids: list[str], timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """Poll GET /jobs/<id> until every job has ended; returns id -> final job JSON."""
    deadline = time.monotonic() + timeout
    final: dict[str, dict[str, Any]] = {}
    while len(final) < len(ids):
        assert time.monotonic() < deadline, f"jobs still running after {timeout:.0f} s: {final}"
        for job_id in ids:
            if job_id not in final:
                info = requests.get(f"{url}/jobs/{job_id}", timeout=10).json()
                if info["status"] in ("finished", "failed", "canceled"):
                    final[job_id] = info
        time.sleep(0.1)
    return final


def model_version(backend: Any, project: int) -> str:
    r = requests.post(
        f"{backend.url}/setup", json={"project": f"{project}.1795340308", "schema": CONFIG}, timeout=10
    )
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def check_one_prediction_each(
    e2e: Any, ls: Any, project: int, task_group: dict[int, str], version: str
) -> dict[int, dict[str, Any]]:
    by_task = e2e.predictions_by_task(ls, project)
    assert sorted(by_task) == sorted(task_group), (sorted(by_task), sorted(task_group))
    for tid, preds in by_task.items():
        assert len(preds) == 1, f"task {tid} has {len(preds)} predictions"
        p = preds[0]
        assert p["model_version"] == version and 0.0 <= p["score"] <= 1.0
        for region in p["result"]:
            w, h = region["original_width"], region["original_height"]
            assert (
                region["type"] == "brushlabels"
                and np.asarray(decode_rle(region["value"]["rle"])).size == w * h * 4
            )
    return {t: ps[0] for t, ps in by_task.items()}


@pytest.fixture(scope="module")
def rq_backend(
    label_studio: Any,
    redis_db: str,
    tmp_path_factory: pytest.TempPathFactory,
    start_backend: Any,
    start_worker: Any,
    e2e: Any,
) -> Iterator[Any]:
    """The backend with REDIS_URL, and two workers sharing its MODEL_DIR and feature cache."""
    base = tmp_path_factory.mktemp("rq-stack")
    env = {
        "REDIS_URL": redis_db,
        "COSOD_QUEUE": "cosod-e2e",
        "MODEL_DIR": str(base / "model"),
        "COSOD_CACHE_DIR": str(base / "features"),
    }
    ls_env = {"LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": e2e.TOKEN}
    with (
        start_worker(base, {**env, **ls_env}, name="w1"),
        start_worker(base, {**env, **ls_env}, name="w2"),
        start_backend(label_studio.url, e2e.TOKEN, base / "api", **env) as api,
    ):
        deadline = time.monotonic() + 120
        while requests.get(f"{api.url}/health", timeout=10).json().get("workers") != 2:
            assert time.monotonic() < deadline, "the two workers did not register within 120 s"
            time.sleep(0.3)
        yield api


def test_prelabel_on_rq_workers(label_studio: Any, rq_backend: Any, e2e: Any) -> None:
    ls, api = label_studio, rq_backend
    project, task_group = e2e.create_grouped_project(
        ls, {"reds": 4, "blues": 4, "greens": 4}, title="rq prelabel"
    )
    version = model_version(api, project)

    r = requests.post(f"{api.url}/jobs/prelabel", json={"project": project}, timeout=60)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (
        body["queue"] == "rq" and len(body["jobs"]) == 3 and sorted(body["created"]) == sorted(body["jobs"])
    )
    assert all(j.startswith(f"prelabel-p{project}-") and j.endswith(version) for j in body["jobs"])
    final = wait_jobs(api.url, body["jobs"])
    for info in final.values():
        assert info["status"] == "finished", info
        assert info["progress"] == {"done": 4, "total": 4} and info["result"]["pushed"] == 4
        assert info["project"] == project and info["meta"]["model_version"] == version
    check_one_prediction_each(e2e, ls, project, task_group, version)

    # asking again creates no job and no prediction
    again = requests.post(f"{api.url}/jobs/prelabel", json={"project": project}, timeout=60).json()
    assert again["created"] == [] and sorted(again["existing"]) == sorted(body["jobs"])
    time.sleep(0.5)
    assert sum(len(v) for v in e2e.predictions_by_task(ls, project).values()) == 12

    listed = requests.get(f"{api.url}/jobs", params={"project": project}, timeout=10).json()["jobs"]
    assert sorted(j["id"] for j in listed) == sorted(body["jobs"])

    # one group only, under another rule: a new job for the whole project that pushes nothing new
    one = requests.post(
        f"{api.url}/jobs/prelabel", json={"project": project, "group_by": "project"}, timeout=60
    )
    assert one.status_code == 202 and len(one.json()["created"]) == 1
    (info,) = wait_jobs(api.url, one.json()["jobs"]).values()
    assert info["status"] == "finished" and info["result"]["pushed"] == 0 and info["result"]["skipped"] == 12
    check_one_prediction_each(e2e, ls, project, task_group, version)

    # a task imported into a group later: asking again makes a new job for that group only
    reds = sorted(t for t, g in task_group.items() if g == "reds")
    image = e2e.ls_api(ls, "GET", f"/api/tasks/{reds[0]}")["data"]["image"]
    e2e.ls_api(ls, "POST", f"/api/projects/{project}/import", json=[{"image": image, "group": "reds"}])
    listed = e2e.ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    added = max(t["id"] for t in listed)
    later = requests.post(f"{api.url}/jobs/prelabel", json={"project": project}, timeout=60).json()
    assert len(later["created"]) == 1 and len(later["existing"]) == 2, later
    (info,) = wait_jobs(api.url, later["created"]).values()
    assert info["status"] == "finished" and info["result"]["group"] == "field:group=reds", info
    assert (info["result"]["pushed"], info["result"]["skipped"]) == (1, 4)
    check_one_prediction_each(e2e, ls, project, {**task_group, added: "reds"}, version)


def test_bad_job_requests_answer_4xx_json(label_studio: Any, rq_backend: Any, e2e: Any) -> None:
    api = rq_backend
    project, _ = e2e.create_grouped_project(label_studio, {"a": 1}, title="bad input")
    cases = [
        ({"project": 999999}, 404, "999999"),
        ({"project": "x"}, 400, "'x'"),
        ({"project": project, "group_by": "colour"}, 400, "'colour'"),
        ({"project": project, "groups": ["nope"]}, 400, "'nope'"),
        ({"project": project, "groups": "a"}, 400, "'a'"),
        ({"project": project, "extra": 1}, 400, "extra"),
    ]
    for body, status, quoted in cases:
        r = requests.post(f"{api.url}/jobs/prelabel", json=body, timeout=60)
        assert r.status_code == status and quoted in r.json()["error"], (body, r.status_code, r.text)
    r = requests.post(f"{api.url}/jobs/prelabel", data="not json", timeout=10)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]
    for method in ("GET", "DELETE"):
        r = requests.request(method, f"{api.url}/jobs/no-such-job", timeout=10)
        assert r.status_code == 404 and "no-such-job" in r.json()["error"]
    r = requests.get(f"{api.url}/jobs", params={"project": "abc"}, timeout=10)
    assert r.status_code == 400 and "'abc'" in r.json()["error"]
    assert "Traceback" not in Path(api.log).read_text(errors="replace")


def test_prelabel_in_process_and_the_cli(label_studio: Any, backend: Any, e2e: Any) -> None:
    ls = label_studio
    project, task_group = e2e.create_grouped_project(ls, {"reds": 3, "blues": 2}, title="in-process prelabel")
    version = model_version(backend, project)
    before = requests.get(f"{backend.url}/jobs/coverage", params={"project": project}, timeout=60).json()
    assert (before["model_version"], before["tasks"], before["missing"]) == (version, 5, 5), before
    assert {(g["group"], g["missing"], g["job_status"]) for g in before["groups"]} == {
        ("reds", 3, "missing"),
        ("blues", 2, "missing"),
    }
    cli = [sys.executable, "-m", "backend.api.cli", "--backend", backend.url]
    run = subprocess.run(
        [*cli, "prelabel", "--project", str(project), "--wait", "--poll", "0.1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    assert f"project {project}: 2 group jobs (2 new, 0 already queued or done)" in run.stdout
    assert "5/5" in run.stderr  # the tqdm bar reached the total
    check_one_prediction_each(e2e, ls, project, task_group, version)
    after = requests.get(f"{backend.url}/jobs/coverage", params={"project": project}, timeout=60).json()
    assert (after["predicted"], after["missing"]) == (5, 0), after
    assert {g["job_status"] for g in after["groups"]} == {"finished"}

    r = requests.post(f"{backend.url}/jobs/prelabel", json={"project": project}, timeout=60)
    assert r.status_code == 202 and r.json()["queue"] == "inprocess" and r.json()["created"] == []
    assert sum(len(v) for v in e2e.predictions_by_task(ls, project).values()) == 5

    for args, needle in (
        (["prelabel", "--project", "999999"], "999999"),
        (["--backend", "http://127.0.0.1:9", "prelabel", "--project", "1"], "unreachable"),
    ):
        bad = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60, cwd=REPO)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], bad.stderr
    assert e2e.ls_api(ls, "GET", f"/api/projects/{project}")["id"] == project


def _run_with_one_worker(
    ls: Any, e2e: Any, tmp_path: Path, start_backend: Any, start_worker: Any, env: dict[str, str], **kw: Any
) -> tuple[int, dict[int, str], dict[str, dict[str, Any]]]:
    """A project of groups a (3), b (3), c (2) pre-annotated by one worker; returns the project, its tasks'
    groups and each group's job result."""
    project, task_group = e2e.create_grouped_project(ls, {"a": 3, "b": 3, "c": 2}, title=env["COSOD_QUEUE"])
    wenv = {**env, "LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": e2e.TOKEN}
    with (
        start_backend(ls.url, e2e.TOKEN, tmp_path / "api", **env) as api,
        start_worker(tmp_path, wenv, name=env["COSOD_QUEUE"], **kw),
    ):
        r = requests.post(f"{api.url}/jobs/prelabel", json={"project": project}, timeout=60)
        assert r.status_code == 202, r.text
        final = wait_jobs(api.url, r.json()["jobs"], timeout=180)
        version = model_version(api, project)
    assert all(info["status"] == "finished" for info in final.values()), final
    check_one_prediction_each(e2e, ls, project, task_group, version)
    results = {info["result"]["group"].split("=", 1)[1]: info["result"] for info in final.values()}
    return project, task_group, results


def test_a_worker_reads_the_next_groups_images_while_it_computes(
    label_studio: Any, redis_db: str, tmp_path: Path, start_backend: Any, start_worker: Any, e2e: Any
) -> None:
    env = {"REDIS_URL": redis_db, "COSOD_QUEUE": "cosod-e2e-ahead", "MODEL_DIR": str(tmp_path / "model")}
    # each pipeline call takes a second longer, so the next group's images are surely in by its start
    run = _run_with_one_worker(label_studio, e2e, tmp_path, start_backend, start_worker, env, slow_s=1.0)
    results = run[2]
    assert {g: r["images_read_ahead"] for g, r in results.items()} == {"a": 0, "b": 3, "c": 2}
    assert all(r["pushed"] == r["total"] and r["timings"]["pipeline"] >= 1.0 for r in results.values())


def test_workers_read_uploads_from_label_studios_media_folder(
    label_studio: Any, redis_db: str, tmp_path: Path, start_backend: Any, start_worker: Any, e2e: Any
) -> None:
    ls = label_studio
    media = Path(ls.log).parent / "ls-data" / "media"  # Label Studio's MEDIA_ROOT in the fixture's data dir
    downloads = Path(ls.log).read_text(errors="replace").count("GET /data/upload/")
    env = {
        "REDIS_URL": redis_db,
        "COSOD_QUEUE": "cosod-e2e-media",
        "MODEL_DIR": str(tmp_path / "model"),
        "COSOD_LS_MEDIA_ROOT": str(media),
    }
    project, *_ = _run_with_one_worker(ls, e2e, tmp_path, start_backend, start_worker, env)
    assert (media / "upload" / str(project)).is_dir()
    assert Path(ls.log).read_text(errors="replace").count("GET /data/upload/") == downloads
