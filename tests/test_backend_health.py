"""/health says what is wrong: NOT_CONFIGURED while no task image can be read, each error's message also as
the HTTP reason phrase (what Label Studio 1.23.2 shows of a failing /health or /setup)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from backend.api.app import create_app
from backend.api.health import REASON_LIMIT, image_access, status_line
from backend.settings import Settings


def fake_pipeline(settings: Settings) -> Any:
    return SimpleNamespace(config=SimpleNamespace(model=settings.model_name), version_id="fixed")


def client_for(tmp_path: Any, **kw: Any) -> Any:
    app = create_app(Settings(model_dir=str(tmp_path / "m"), **kw), pipeline_factory=fake_pipeline)
    assert app.extensions["cosod"]["loader"].wait(30)
    return app.test_client()


@pytest.mark.parametrize(
    ("kw", "missing"),
    [
        ({}, ["LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY"]),
        ({"label_studio_url": "http://ls:8080"}, ["LABEL_STUDIO_API_KEY"]),
        ({"label_studio_api_key": "k"}, ["LABEL_STUDIO_URL"]),
    ],
)
def test_no_way_to_read_images_is_not_ready_and_names_the_settings(tmp_path, kw, missing) -> None:
    r = client_for(tmp_path, **kw).get("/health")
    assert r.status_code == 503 and r.json["status"] == "NOT_CONFIGURED" and r.json["ready"] is False
    assert r.json["missing"] == missing
    note = r.json["label_studio_access"]
    assert "Personal Access Token" in note and "restart the backend" in note
    assert all(name in note for name in missing)
    assert r.json["pipeline_version"] == "fixed"  # the model itself is loaded
    reason = r.status.split(" ", 1)[1]
    assert reason.startswith(" and ".join(missing) + " not set on the ML backend, so it cannot read")
    assert "Account & Settings" in reason and len(reason) <= REASON_LIMIT


def test_the_key_never_shows(tmp_path) -> None:
    r = client_for(tmp_path, label_studio_api_key="sekrit-token-123").get("/health")
    assert r.status_code == 503 and "sekrit-token-123" not in r.get_data(as_text=True)


@pytest.mark.parametrize(
    ("kw", "readable"),
    [
        (
            {"local_files_root": "files"},
            "/data/local-files/ images below LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT",
        ),
        (
            {"ls_media_root": "media", "label_studio_url": "http://ls:8080"},
            "uploads found in COSOD_LS_MEDIA_ROOT",
        ),
    ],
)
def test_images_from_disk_need_no_key(tmp_path, kw, readable) -> None:
    kw = {k: str(tmp_path / v) if k.endswith("_root") else v for k, v in kw.items()}
    r = client_for(tmp_path, **kw).get("/health")
    assert r.status_code == 200 and r.json["status"] == "UP" and r.status == "200 OK"
    assert "missing" not in r.json
    assert f"only {readable} are read" in r.json["label_studio_access"]


def test_configured_has_no_note(tmp_path) -> None:
    r = client_for(tmp_path, label_studio_url="http://ls:8080", label_studio_api_key="k").get("/health")
    assert r.status_code == 200 and r.json["status"] == "UP" and "label_studio_access" not in r.json
    assert image_access(Settings(label_studio_url="http://ls:8080", label_studio_api_key="k")) == ([], None)


def test_an_error_answer_carries_its_message_as_the_reason_phrase(tmp_path) -> None:
    c = client_for(tmp_path, local_files_root=str(tmp_path))
    r = c.post(
        "/setup", json={"project": "3.1795340308", "schema": "<View><Image name='i' value='$i'/></View>"}
    )
    assert 400 <= r.status_code < 500
    assert r.status == status_line(r.status_code, r.json["error"])
    assert r.json["error"][:40] in r.status


def test_status_line_is_a_valid_http_reason_phrase() -> None:
    line = status_line(503, "naïve <b>bold</b>\r\nnext\tline " + "x" * 400)
    assert line.startswith("503 na?ve bbold/b next line x")
    assert all(" " <= c <= "~" for c in line) and "<" not in line and ">" not in line
    assert len(line) == 4 + REASON_LIMIT and line.endswith("...")
    assert status_line(200, "") == "200"
