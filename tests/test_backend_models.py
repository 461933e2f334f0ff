"""Model selection: COSOD_MODEL, and a per-project override through the ML connection's extra params."""

from types import SimpleNamespace

import pytest

from backend.api.app import create_app
from backend.settings import Settings

CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    '<Label value="Object"/></BrushLabels></View>'
)


def fake_factory(built):
    """Records which model each pipeline is built for; the pipelines only need a config and a version."""

    def factory(settings):
        built.append((settings.model_name, settings.ums_checkpoint))
        return SimpleNamespace(
            config=SimpleNamespace(model=settings.model_name), version_id=f"id-{settings.model_name}"
        )

    return factory


def test_settings_read_the_model_and_its_checkpoints():
    s = Settings.from_env(
        {"COSOD_MODEL": "ums", "COSOD_UMS_CHECKPOINT": "/m/ums.pt", "COSOD_STAGE1_CHECKPOINT": "/m/s1.pt"}
    )
    assert (s.model_name, s.ums_checkpoint, s.stage1_checkpoint) == ("ums", "/m/ums.pt", "/m/s1.pt")
    assert Settings.from_env({}).model_name == "scosparc"
    with pytest.raises(ValueError, match="COSOD_MODEL must be one of"):
        Settings.from_env({"COSOD_MODEL": "yolo"})


def test_projects_choose_their_model_through_extra_params(tmp_path):
    built = []
    settings = Settings(model_dir=str(tmp_path), ums_checkpoint="/m/ums.pt")
    app = create_app(settings, pipeline_factory=fake_factory(built))
    client = app.test_client()
    r = client.post(
        "/setup", json={"project": "3.1700000000", "schema": CONFIG, "extra_params": {"model": "ums"}}
    )
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["model_version"].startswith("ums-p3-")
    r = client.post("/setup", json={"project": "4.1700000000", "schema": CONFIG})
    assert r.get_json()["model_version"].startswith("scosparc-p4-")
    assert sorted(built) == [("scosparc", "/m/ums.pt"), ("ums", "/m/ums.pt")]  # each model loaded once
    r = client.post(
        "/setup", json={"project": "5.1700000000", "schema": CONFIG, "extra_params": {"model": "x"}}
    )
    assert r.status_code == 400 and "model must be one of" in r.get_json()["error"]
    versions = client.get("/versions").get_json()["versions"]
    assert any(v.startswith("ums-p3-") for v in versions) and any(
        v.startswith("scosparc-p4-") for v in versions
    )
