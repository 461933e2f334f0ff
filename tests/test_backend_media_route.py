"""backend.labelstudio.media.route: the image read policy as a table (what is read from where, or refused)."""

from __future__ import annotations

import pytest

from backend.errors import ImageFetchError, ImageRefusedError
from backend.labelstudio.media import Route, route
from backend.settings import Settings

LS = "http://ls.example:8080"


def settings(**kw: object) -> Settings:
    return Settings.from_env({"LABEL_STUDIO_URL": LS}).with_(**kw)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/data/upload/3/a.png", Route("download", "/data/upload/3/a.png")),
        ("upload/3/a.png", Route("download", "/data/upload/3/a.png")),
        ("/upload/3/a.png", Route("download", "/data/upload/3/a.png")),
        (f"{LS}/data/upload/3/a.png", Route("download", "/data/upload/3/a.png")),
        (
            "/storage-data/uploaded/?filepath=3/a.png",
            Route("download", "/storage-data/uploaded/?filepath=3/a.png"),
        ),
        ("HTTP://LS.Example:8080/data/upload/3/a.png", Route("download", "/data/upload/3/a.png")),
    ],
)
def test_label_studio_media_is_downloaded_with_its_token(url: str, expected: Route) -> None:
    assert route(url, settings()) == expected


def test_local_files_and_uploads_are_read_from_disk_when_their_roots_are_mounted(tmp_path) -> None:
    s = settings(local_files_root=str(tmp_path), ls_media_root=str(tmp_path))
    assert route("/data/local-files/?d=pics/a.png", s) == Route("local", "/data/local-files/?d=pics/a.png")
    assert route("/data/upload/3/a.png", s) == Route(
        "media", "upload/3/a.png", fallback="/data/upload/3/a.png"
    )


def test_cloud_uris_go_through_label_studio_presign_for_their_task_in_the_request_project() -> None:
    r = route("s3://bucket/key with space.jpg", settings(), task_id=7, project_id=4)
    assert r.kind == "download" and r.follow_redirects and r.project == 4
    assert r.target.startswith("/tasks/7/presign/?fileuri=")
    with pytest.raises(ImageFetchError, match="needs the task id"):
        route("s3://bucket/key.jpg", settings(), project_id=4)
    with pytest.raises(ImageRefusedError, match="no project was given"):
        route("s3://bucket/key.jpg", settings(), task_id=7)


def test_the_default_port_is_the_same_origin() -> None:
    s = Settings.from_env({"LABEL_STUDIO_URL": "https://ls.example"})
    assert route("https://ls.example:443/data/upload/3/a.png", s) == Route("download", "/data/upload/3/a.png")
    with pytest.raises(ImageRefusedError, match="is not allowed"):
        route("http://ls.example/data/upload/3/a.png", s)


def test_local_files_without_their_root_are_refused() -> None:
    with pytest.raises(ImageRefusedError, match="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, which is not set"):
        route("/data/local-files/?d=pics/a.png", settings())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://evil.example/data/upload/3/a.png", "host 'evil.example' is not allowed"),
        ("https://ls.example:8080/data/upload/3/a.png", "is not allowed"),  # another scheme is another origin
        ("file:///etc/passwd", "not a Label Studio media URL"),
        ("/etc/passwd", "only /data/upload/"),
        ("relative/a.png", "not a Label Studio media URL"),
        ("data:image/png;base64,AAAA", "not a Label Studio media URL"),
        ("/data/upload/../../etc/passwd", "'..' is not allowed"),
        ("/data/upload/%2e%2e/%2E%2E/etc/passwd", "'..' is not allowed"),
        (f"{LS}/api/projects/", "only /data/upload/"),
        ("/data/local-filesX/?d=a.png", "only /data/upload/"),
        ("/data/local-files/sub/?d=a.png", "only /data/upload/"),
        ("/data/uploads/3/a.png", "only /data/upload/"),
        ("/data/upload/", "only /data/upload/"),
        ("/storage-data/uploaded-x/?filepath=a.png", "only /data/upload/"),
        ("http://user@ls.example:8080/data/upload/3/a.png", "is not allowed"),
        ("http://ls.example:8080@evil.example/data/upload/3/a.png", "is not allowed"),
        ("http://ls.example:8081/data/upload/3/a.png", "is not allowed"),  # another port: another origin
        ("/data/upload/" + "a" * 9000, "over the limit of 8192 characters"),
        ("/data/upload/\ud800.png", "lone surrogate"),
    ],
)
def test_everything_else_is_refused_with_what_is_allowed(url: str, message: str) -> None:
    with pytest.raises(ImageRefusedError, match=message):
        route(url, settings())


def test_without_label_studio_url_an_absolute_url_is_refused() -> None:
    with pytest.raises(ImageRefusedError, match="LABEL_STUDIO_URL is not set"):
        route(f"{LS}/data/upload/3/a.png", Settings.from_env({}))
