"""The /jobs routes' input checks (Flask test client), the worker and CLI entry points, and the deployment
files (docker-compose.yml, Dockerfile). The jobs themselves run end to end in tests/e2e/test_prelabel.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backend.api.app import create_app
from backend.grouping import GroupKey
from backend.jobs.enqueue import group_job_id
from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(tiny_pipeline, tmp_path):
    from backend.jobs import queue as jobqueue

    with jobqueue._queues_lock:  # this process's in-process queue starts empty (other modules queue jobs too)
        jobqueue._queues.clear()
    app = create_app(Settings(model_dir=str(tmp_path)), pipeline_factory=lambda s: tiny_pipeline)
    return app.test_client()


@pytest.mark.parametrize(
    ("body", "status", "quoted"),
    [
        ({"project": "x"}, 400, "'x'"),
        ({"project": 0}, 400, "0"),
        ({"project": True}, 400, "got True"),
        ({"project": 1, "group_by": 3}, 400, "3"),
        ({"project": 1, "groups": "a"}, 400, "'a'"),
        ({"project": 1, "colour": "red"}, 400, "colour"),
        ([1, 2], 400, "JSON object"),
    ],
)
def test_prelabel_refuses_bad_input(client, body, status, quoted) -> None:
    r = client.post("/jobs/prelabel", json=body)
    assert r.status_code == status and quoted in r.json["error"], r.json


def test_a_project_without_label_studio_is_a_clear_error(client) -> None:
    r = client.post("/jobs/prelabel", json={"project": 5})  # no /setup seen, no Label Studio configured
    assert r.status_code == 502 and "LABEL_STUDIO_URL" in r.json["error"], r.json


def test_job_routes_on_the_in_process_queue(client) -> None:
    assert client.get("/jobs/nope").status_code == 404 and "'nope'" in client.get("/jobs/nope").json["error"]
    assert client.delete("/jobs/nope").status_code == 404
    assert client.get("/jobs").json == {"jobs": []}
    assert client.get("/jobs?project=abc").status_code == 400
    assert client.get("/health").json["queue"] == "in-process"


def test_job_ids_are_deterministic_and_distinct() -> None:
    a = group_job_id(3, GroupKey("field:group", "cats"), "scosparc-p3-0123abcd")
    assert a == group_job_id(3, GroupKey("field:group", "cats"), "scosparc-p3-0123abcd")
    assert a.startswith("prelabel-p3-") and a.endswith("-scosparc-p3-0123abcd")
    others = {
        group_job_id(3, GroupKey("field:group", "dogs"), "scosparc-p3-0123abcd"),
        group_job_id(3, GroupKey("field:group", None), "scosparc-p3-0123abcd"),
        group_job_id(3, GroupKey("project", None), "scosparc-p3-0123abcd"),
        group_job_id(4, GroupKey("field:group", "cats"), "scosparc-p3-0123abcd"),
        group_job_id(3, GroupKey("field:group", "cats"), "scosparc-p3-ffffffff"),
    }
    assert a not in others and len(others) == 5
    key = GroupKey("field:group", "cats")
    with_tasks = group_job_id(3, key, "v", [12, 10, 11])
    assert with_tasks == group_job_id(3, key, "v", [10, 11, 12, 11])  # the same members, in any order
    assert with_tasks != group_job_id(3, key, "v", [10, 11, 12, 13])  # a task added: a new job


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
    full.update(env)
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO, env=full)


def test_worker_needs_redis_and_says_so_in_one_line() -> None:
    run = _run([sys.executable, "-m", "backend.jobs.worker"])
    assert run.returncode == 2 and run.stderr.strip() == (
        "cosod-worker: REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)"
    )
    run = _run([sys.executable, "-m", "backend.jobs.worker"], REDIS_URL="redis://127.0.0.1:1/0")
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "127.0.0.1:1" in lines[0]


def test_cli_reports_an_unreachable_backend_in_one_line() -> None:
    run = _run([sys.executable, "-m", "backend.api.cli", "--backend", "http://127.0.0.1:9", "jobs"])
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "unreachable" in lines[0]


def test_compose_file_has_every_service_and_a_gpu_worker() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"label-studio", "redis", "backend", "worker", "rq-dashboard"} <= set(services)
    assert services["label-studio"]["image"].startswith("heartexlabs/label-studio:1.23")
    (device,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu", "utility"]
    assert services["worker"]["command"] == ["cosod-worker"] and "ports" not in services["worker"]
    # replicas get the same reservation: each sees every GPU and claims one in Redis
    assert device["count"] == "all" and services["worker"]["environment"]["COSOD_WORKER_GPU"] == "auto"
    ls_data = next(v for v in services["label-studio"]["volumes"] if v.endswith(":/label-studio/data"))
    for name in ("backend", "worker"):
        mounts = {v.split(":")[1] for v in services[name]["volumes"]}
        assert {"/data/models", "/data/features", "/opt/cosod/weights"} <= mounts
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
        # uploads are read from Label Studio's media folder, mounted read-only
        assert f"{ls_data}:ro" in services[name]["volumes"]
        assert services[name]["environment"]["COSOD_LS_MEDIA_ROOT"] == "/label-studio/data/media"
    # authentication is required: compose refuses to start without the pair, and rq-dashboard asks for it
    env = services["backend"]["environment"]
    assert env["BASIC_AUTH_USER"].startswith("${BASIC_AUTH_USER:?") and env["BASIC_AUTH_PASS"].startswith(
        "${BASIC_AUTH_PASS:?"
    )
    assert services["rq-dashboard"]["environment"]["RQ_DASHBOARD_PASSWORD"].startswith("${BASIC_AUTH_PASS:?")
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG COSOD_FETCH_WEIGHTS" in dockerfile and "cosod weights fetch" in dockerfile


def _compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1, e.g. Debian's package); None if neither."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_validates() -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASIC_AUTH_")}
    env["LABEL_STUDIO_API_KEY"] = "test-token"
    run = subprocess.run([*compose, "config", "--quiet"], cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "BASIC_AUTH_USER" in run.stderr, run.stderr  # no start without auth
    env.update(BASIC_AUTH_USER="admin", BASIC_AUTH_PASS="test-pass")
    run = subprocess.run([*compose, "config", "--quiet"], cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
