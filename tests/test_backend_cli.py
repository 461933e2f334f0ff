"""``cosod-backend`` against a real running app (werkzeug on 127.0.0.1, basic auth on), and the route it
promotes with, ``POST /versions/promote``: auth, 4xx answers, success, /predict following the promotion."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_backend_app import BRUSH, project_with_groups
from werkzeug.serving import make_server

from backend.api import cli
from backend.api.app import create_app
from backend.learning.versions import VersionRecord
from backend.settings import Settings
from cosod.scosparc import Stage1Checkpoint, Stage1Net, save_stage1

AUTH = ("cli-user", "cli-pass")
PID = 12


@pytest.fixture
def app(fake_ls: Any, tiny_pipeline: Any, tmp_path: Path) -> Any:
    from backend.jobs import queue as jobqueue

    with jobqueue._queues_lock:  # a fresh in-process queue: earlier modules' jobs (retrying) do not run first
        jobqueue._queues.clear()
    settings = Settings(
        model_dir=str(tmp_path / "model_dir"),
        label_studio_url=fake_ls.url,
        label_studio_api_key="tok",
        backbone="tiny",
        basic_auth_user=AUTH[0],
        basic_auth_pass=AUTH[1],
    )
    app = create_app(settings, lambda s: tiny_pipeline)
    assert app.extensions["cosod"]["loader"].wait(30)
    return app


@pytest.fixture
def client(app: Any) -> Any:
    c = app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = _basic(*AUTH)
    return c


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def set_up_project(client: Any) -> str:
    r = client.post("/setup", json={"project": f"{PID}.1795340308", "schema": BRUSH})
    assert r.status_code == 200, r.get_json()
    return r.get_json()["model_version"]


def add_version(app: Any, n: int, *, base: str, keep_file: bool = True) -> str:
    """Register a fine-tuned version (a seeded head, not active), as a fine-tune would."""
    model = app.extensions["cosod"]["model"]
    pipeline = model.loader.require(timeout=5)
    registry = model.registry
    registry.ensure_base(PID, "scosparc", base, {})
    version = f"scosparc-p{PID}-v{n}"
    path = registry.checkpoint_path(PID, version)
    save_stage1(Stage1Checkpoint(net=Stage1Net.seeded(pipeline.backbone.embed_dim), parent=base), path)
    rec = VersionRecord(
        PID,
        version,
        "scosparc",
        parent=base,
        path=str(path),
        scores={"iou": 0.5 + n / 100},
        decision="test",
        config={"backbone_id": pipeline.backbone.id},
    )
    registry.register(rec, activate=False)
    if not keep_file:
        path.unlink()
    return version


def predicted_version(client: Any, fake_ls: Any) -> str:
    tasks = project_with_groups(fake_ls, {"a": 2})
    r = client.post("/predict", json={"tasks": tasks[:1], "project": f"{PID}.1795340308"})
    assert r.status_code == 200, r.get_json()
    return r.get_json()["results"][0]["model_version"]


def promote(client: Any, body: Any) -> tuple[int, dict[str, Any]]:
    r = client.post("/versions/promote", json=body)
    return r.status_code, r.get_json()


def test_promote_needs_auth(app: Any) -> None:
    r = app.test_client().post("/versions/promote", json={"project": PID, "version": "x"})
    assert r.status_code == 401 and "authentication" in r.get_json()["error"]
    bad = app.test_client().post(
        "/versions/promote",
        json={"project": PID, "version": "x"},
        headers={"Authorization": _basic(AUTH[0], "wrong")},
    )
    assert bad.status_code == 401


def test_promote_refuses_bad_input_with_a_json_4xx(app: Any, client: Any) -> None:
    base = set_up_project(client)
    v1 = add_version(app, 1, base=base)
    gone = add_version(app, 2, base=base, keep_file=False)
    cases = [
        ([PID, v1], 400, "JSON object"),
        ({"project": PID}, 400, "needs 'project' (an id) and 'version'"),
        ({"version": v1}, 400, "needs 'project'"),
        ({"project": PID, "version": v1, "force": True}, 400, "'force'"),
        ({"project": "x", "version": v1}, 400, "'x'"),
        ({"project": PID, "version": 3}, 400, "got 3"),
        ({"project": PID, "version": ""}, 400, "got ''"),
        ({"project": PID, "version": "v" * 201}, 400, "1-200 characters"),
        ({"project": 99, "version": v1}, 404, "unknown project 99"),
        (
            {"project": PID, "version": "scosparc-p12-v9"},
            404,
            f"no version 'scosparc-p12-v9'; known: ['{base}'",
        ),
        ({"project": PID, "version": gone}, 409, "checkpoint"),
    ]
    for body, status, text in cases:
        got, out = promote(client, body)
        assert got == status and text in out["error"], (body, got, out)
    r = client.post("/versions/promote", data="{", content_type="application/json")
    assert r.status_code == 400 and "not valid JSON" in r.get_json()["error"]
    assert app.extensions["cosod"]["model"].registry.active_name(PID) == base  # nothing changed


def test_promote_changes_what_predict_serves_and_rolls_back(app: Any, client: Any, fake_ls: Any) -> None:
    base = set_up_project(client)
    assert predicted_version(client, fake_ls) == base
    v1 = add_version(app, 1, base=base)
    status, out = promote(client, {"project": PID, "version": v1})
    assert status == 200, out
    assert out["active"] == out["serving"] == v1 and out["previous"] == base and "warning" not in out
    assert out["record"]["status"] == "active" and out["record"]["parent"] == base
    assert predicted_version(client, fake_ls) == v1
    assert client.get(f"/versions?project={PID}").get_json()["model_version"] == v1
    status, out = promote(client, {"project": PID, "version": base})
    assert status == 200 and out["active"] == out["serving"] == base and out["previous"] == v1, out
    assert predicted_version(client, fake_ls) == base


def test_promote_to_the_base_model_before_any_finetune(app: Any, client: Any) -> None:
    base = set_up_project(client)
    status, out = promote(client, {"project": PID, "version": base})
    assert status == 200 and out["active"] == out["previous"] == out["serving"] == base, out


# -- the CLI against a running server -------------------------------------------------------------------


@pytest.fixture
def server(app: Any) -> Iterator[str]:
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}"
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The CLI's environment: the server's credentials, no backend URL, a fresh folder as the cwd."""
    for name in ("COSOD_BACKEND_URL", "MODEL_DIR", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BASIC_AUTH_USER", AUTH[0])
    monkeypatch.setenv("BASIC_AUTH_PASS", AUTH[1])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_versions_and_promote_talk_to_the_running_backend(
    app: Any, client: Any, server: str, env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    base = set_up_project(client)
    code, out, err = run(capsys, "--backend", server, "versions", "--project", str(PID))
    assert (code, err) == (
        0,
        "",
    ) and out == f"project {PID}: no fine-tuned version yet; the base model {base} serves\n"
    v1 = add_version(app, 1, base=base)
    # --backend after the sub-command works too
    code, out, err = run(capsys, "promote", "--project", str(PID), "--version", v1, "--backend", server)
    assert (code, err) == (0, "") and out == f"project {PID}: {v1} is now the active version (was {base})\n"
    # the environment variable sets the default
    monkeypatch.setenv("COSOD_BACKEND_URL", server)
    code, out, err = run(capsys, "versions", "--project", str(PID))
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["version", "status", "parent"], out
    assert lines[1].split()[:3] == [base, "base", "-"]
    assert lines[2].split()[:5] == ["*", v1, "active", base, "0.510"]
    # the option beats the variable
    code, _, err = run(capsys, "--backend", "http://127.0.0.1:9", "versions", "--project", str(PID))
    assert code == 2 and "http://127.0.0.1:9 is unreachable" in err
    assert not (env / "model_dir").exists() and list(env.iterdir()) == []  # nothing written where it ran


def test_cli_errors_are_one_line_and_exit_2(
    client: Any, server: str, env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    set_up_project(client)
    code, out, err = run(capsys, "--backend", server, "promote", "--project", str(PID), "--version", "nope")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("cosod-backend: POST /versions/promote: HTTP 404: project 12 has no version 'nope'")
    code, _, err = run(capsys, "--backend", server, "versions", "--project", "99")
    assert code == 2 and err.count("\n") == 1 and "project 99: the backend at" in err
    code, _, err = run(capsys, "--backend", server, "cancel", "no-such-job")
    assert code == 2 and "HTTP 404" in err
    monkeypatch.setenv("BASIC_AUTH_PASS", "wrong")
    code, _, err = run(capsys, "--backend", server, "versions", "--project", str(PID))
    assert code == 2 and "HTTP 401" in err
    code, _, err = run(capsys, "--backend", "ftp://x", "jobs")
    assert code == 2 and err == "cosod-backend: --backend must be an http:// or https:// URL, got 'ftp://x'\n"
    monkeypatch.setenv("COSOD_BACKEND_URL", "localhost:9090")
    code, _, err = run(capsys, "jobs")
    assert code == 2 and "COSOD_BACKEND_URL" in err and "localhost:9090" in err


def test_cancel_says_what_it_did(server: str, env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_backend_training_feedback import _release, blocker

    from backend.jobs import queue as jobqueue

    q = jobqueue.get_queue(Settings(model_dir="unused"))
    _release.clear()
    kw = {"timeout": 60, "result_ttl": 60, "failure_ttl": 60}
    q.enqueue(blocker, job_id="cli-cancel-running", **kw)
    q.enqueue(blocker, job_id="cli-cancel-queued", **kw)
    try:
        for _ in range(1500):
            if q.fetch("cli-cancel-running").status == "started":
                break
            threading.Event().wait(0.02)
        assert q.fetch("cli-cancel-running").status == "started"
        code, out, _ = run(capsys, "--backend", server, "cancel", "cli-cancel-queued")
        assert (code, out) == (0, "canceled job cli-cancel-queued (was queued)\n")
        code, out, _ = run(capsys, "--backend", server, "cancel", "cli-cancel-queued")
        assert (code, out) == (1, "job cli-cancel-queued was already canceled: nothing to cancel\n")
        code, out, _ = run(capsys, "--backend", server, "cancel", "cli-cancel-running")
        assert (code, out) == (
            0,
            "job cli-cancel-running is running: asked it to stop at its next progress step\n",
        )
    finally:
        _release.set()
    q.enqueue(blocker, job_id="cli-cancel-done", **kw)
    assert q.wait_idle(30)  # type: ignore[attr-defined]
    code, out, _ = run(capsys, "--backend", server, "cancel", "cli-cancel-done")
    assert (code, out) == (1, "job cli-cancel-done had already finished: nothing to cancel\n")
