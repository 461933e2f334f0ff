"""backend.labelstudio: which image URLs are read, limits before decoding, tokens, task listing."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import numpy as np
import pytest
from PIL import Image

from backend.errors import ImageFetchError, ImageRefusedError, LabelStudioError, UnknownProjectError
from backend.labelstudio.client import LabelStudioClient
from backend.settings import Settings
from cosod.errors import ImageReadError

KEY = "0123456789abcdef0123456789abcdef"


def png(w: int = 20, h: int = 10, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def client(fake_ls, **kw) -> LabelStudioClient:
    base = dict(label_studio_url=fake_ls.url, label_studio_api_key="legacy-token-123")
    return LabelStudioClient(Settings(**{**base, **kw}))


def test_upload_is_read_from_label_studio_with_the_legacy_token(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/a.png", png(20, 10))
    c = client(fake_ls)
    for url in ("/data/upload/1/a.png", "upload/1/a.png", f"{fake_ls.url}/data/upload/1/a.png"):
        img = c.read_image(url, 7)
        assert img.shape == (10, 20, 3) and img.dtype == np.uint8 and tuple(img[0, 0]) == (200, 10, 10)
    assert all(h.get("Authorization") == "Token legacy-token-123" for _, h in fake_ls.seen)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.png",
        "https://127.0.0.2/data/upload/1/a.png",
        "file:///etc/passwd",
        "/etc/passwd",
        "data:image/png;base64,AAAA",
        "ftp://x/a.png",
        "/data/upload/../../secret.png",
        "relative/a.png",
    ],
)
def test_urls_outside_the_allowed_hosts_are_refused(fake_ls, url: str) -> None:
    with pytest.raises(ImageRefusedError) as info:
        client(fake_ls).read_image(url, 1)
    assert url.split("?")[0][:20] in str(info.value)
    assert fake_ls.seen == []  # refused before any request


def test_other_host_message_names_the_allowed_one(fake_ls) -> None:
    with pytest.raises(ImageRefusedError, match=f"not allowed.*{fake_ls.url}"):
        client(fake_ls).read_image("http://evil.example/x.png", 1)


def test_oversized_download_is_refused_with_the_limit(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/big.png", b"x" * 5000)
    with pytest.raises(ImageRefusedError, match="over the limit of 1000 bytes"):
        client(fake_ls, max_image_bytes=1000).read_image("/data/upload/1/big.png", 1)


def test_oversized_stream_without_length_is_cut(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/big.png", b"x" * 300_000, headers={"Content-Length": ""})
    with pytest.raises(ImageRefusedError, match="over the limit of 100000 bytes"):
        client(fake_ls, max_image_bytes=100_000).read_image("/data/upload/1/big.png", 1)


def test_too_many_pixels_are_refused_before_decoding(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/wide.png", png(40, 30))
    with pytest.raises(ImageRefusedError, match="1200 pixels is over the limit of 1000"):
        client(fake_ls, max_image_pixels=1000).read_image("/data/upload/1/wide.png", 1)


def test_corrupt_image_raises_image_read_error(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/bad.png", b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageReadError, match="not a readable image"):
        client(fake_ls).read_image("/data/upload/1/bad.png", 1)


def test_http_error_is_a_fetch_error(fake_ls) -> None:
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        client(fake_ls).read_image("/data/upload/1/missing.png", 1)


def test_redirects_are_not_followed_for_media(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/r.png", b"", status=302, headers={"Location": "http://example.com/x"})
    with pytest.raises(ImageRefusedError, match="redirect"):
        client(fake_ls).read_image("/data/upload/1/r.png", 1)


def test_local_files_read_from_the_root_only(fake_ls, tmp_path) -> None:
    root = tmp_path / "files"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a.png").write_bytes(png(8, 6))
    (tmp_path / "secret.png").write_bytes(png(8, 6))
    c = client(fake_ls, local_files_root=str(root))
    assert c.read_image("/data/local-files/?d=images/a.png", 1).shape == (6, 8, 3)
    assert c.read_image("/data/local-files/?d=/images/a.png", 1).shape == (6, 8, 3)
    for bad in ("/data/local-files/?d=../secret.png", "/data/local-files/?d=images/../../secret.png"):
        with pytest.raises(ImageRefusedError, match="outside the local-files root") as info:
            c.read_image(bad, 1)
        assert str(root) not in str(info.value)
    assert fake_ls.seen == []


def test_an_oversized_local_file_is_refused_not_a_fetch_error(fake_ls, tmp_path) -> None:
    (tmp_path / "big.png").write_bytes(png(40, 30))
    size = (tmp_path / "big.png").stat().st_size
    c = client(fake_ls, local_files_root=str(tmp_path), max_image_bytes=size - 1)
    with pytest.raises(ImageRefusedError, match=f"{size} bytes is over the limit of {size - 1} bytes"):
        c.read_image("/data/local-files/?d=big.png", 1)


def test_local_files_without_root_are_refused(fake_ls) -> None:
    fake_ls.add_bytes("/data/local-files/", png(5, 5))
    with pytest.raises(ImageRefusedError, match="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
        client(fake_ls).read_image("/data/local-files/?d=images/a.png", 1)
    assert fake_ls.seen == []


def test_cloud_uri_goes_through_the_presign_endpoint(fake_ls) -> None:
    fake_ls.add_handler("/api/tasks/", _tasks_route([{"id": 9, "data": {}}]))
    fake_ls.add_bytes(
        "/tasks/9/presign/", b"", status=302, headers={"Location": f"{fake_ls.url}/signed/a.png"}
    )
    fake_ls.add_bytes("/signed/a.png", png(7, 3))
    assert client(fake_ls).read_image("s3://bucket/a.png", 9, project_id=1).shape == (3, 7, 3)
    assert fake_ls.seen[0][0].startswith("/api/tasks/?")  # is task 9 in project 1?
    assert fake_ls.seen[1][0].startswith("/tasks/9/presign/?fileuri=")
    with pytest.raises(ImageFetchError, match="task id"):
        client(fake_ls).read_image("s3://bucket/a.png", None, project_id=1)


@pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")  # inside label-studio-sdk 2.1.2
def test_personal_access_token_is_exchanged_and_sent_as_bearer(fake_ls) -> None:
    exp = int(time.time()) + 3600
    refresh = jwt.encode({"token_type": "refresh", "exp": exp}, KEY, algorithm="HS256")
    access = jwt.encode({"token_type": "access", "exp": exp}, KEY, algorithm="HS256")
    fake_ls.add_json("/api/token/refresh/", {"access": access})
    fake_ls.add_bytes("/data/upload/1/a.png", png())
    c = client(fake_ls, label_studio_api_key=refresh)
    c.read_image("/data/upload/1/a.png", 1)
    media = [h for p, h in fake_ls.seen if p.startswith("/data/upload")]
    assert media[0]["Authorization"] == f"Bearer {access}"


def test_without_api_key_the_setup_token_is_used(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/a.png", png())
    c = LabelStudioClient(Settings(label_studio_url=fake_ls.url))
    assert not c.configured
    c.offer_token("from-setup")
    assert c.configured
    c.read_image("/data/upload/1/a.png", 1)
    assert fake_ls.seen[-1][1]["Authorization"] == "Token from-setup"


def _tasks_route(tasks):
    def handler(query, headers):
        page = int(query.get("page", ["1"])[0])
        size = int(query.get("page_size", ["100"])[0])
        chunk = tasks[(page - 1) * size : page * size]
        if not chunk and page > 1:
            return 404, {"Content-Type": "application/json"}, b'{"detail": "Invalid page."}'
        body = {"tasks": chunk, "total": len(tasks), "total_annotations": 0, "total_predictions": 0}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    return handler


def test_project_tasks_are_listed_through_the_sdk_and_cached(fake_ls) -> None:
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png", "group": "g"}} for i in range(1, 4)]
    fake_ls.add_handler("/api/tasks/", _tasks_route(tasks))
    c = client(fake_ls)
    got = c.project_tasks(1)
    assert [(t.id, t.data["group"]) for t in got] == [(1, "g"), (2, "g"), (3, "g")]
    n = len(fake_ls.seen)
    assert c.project_tasks(1) == got and len(fake_ls.seen) == n  # cached
    c.forget_project(1)
    c.project_tasks(1)
    assert len(fake_ls.seen) > n
    assert "project=1" in fake_ls.seen[-1][0]


def test_a_burst_of_refreshing_listings_shares_the_next_one(fake_ls) -> None:
    tasks = [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(1, 4)]
    route = _tasks_route(tasks)

    def slow(query: dict, headers: dict) -> tuple:
        time.sleep(0.3)  # the burst arrives while the first listing is under way
        return route(query, headers)

    fake_ls.add_handler("/api/tasks/", slow)
    c = client(fake_ls)
    c.project_tasks(1)
    arrived = time.monotonic()
    assert c.project_tasks(1, refresh=True, since=arrived) and c.list_calls == 2  # older than the request

    def ask(_: int) -> list:
        return c.project_tasks(1, refresh=True, since=time.monotonic())

    with ThreadPoolExecutor(10) as pool:  # 10 at once: the first lists, the 9 that waited share one more
        lists = list(pool.map(ask, range(10)))
    assert c.list_calls == 4 and all(got == lists[0] for got in lists)


def test_unknown_project_and_unreachable_label_studio(fake_ls) -> None:
    fake_ls.add_json("/api/tasks/", {"detail": "Not found."}, status=404)
    with pytest.raises(UnknownProjectError, match="project 99"):
        client(fake_ls).project_tasks(99)
    dead = LabelStudioClient(
        Settings(label_studio_url="http://127.0.0.1:9", label_studio_api_key="t", http_timeout=1.0)
    )
    with pytest.raises(LabelStudioError):
        dead.project_tasks(1)


@pytest.mark.parametrize(
    ("text", "versions"),
    [
        ("", frozenset()),
        ("scosparc-p1-0a1b2c3d", frozenset({"scosparc-p1-0a1b2c3d"})),
        ("a,a-v1", frozenset({"a", "a-v1"})),  # SQLite's GroupConcat
        ("a, a-v1", frozenset({"a", "a-v1"})),  # PostgreSQL's ArrayAgg, quotes removed by Label Studio
        (None, None),  # the column is missing: ask per task
        ("x" * 497, frozenset({"x" * 497})),  # shorter than the cut even with PostgreSQL's quotes
        ("x" * 498, None),  # at the 500-character cut: maybe cut
        (", ".join(["v" * 10] * 40)[:450], None),  # PostgreSQL: 2 quotes per version were cut as well
        ("v" * 400, frozenset({"v" * 400})),
    ],
)
def test_prediction_versions_from_the_data_manager_column(text, versions) -> None:
    from backend.labelstudio.client import parse_versions

    assert parse_versions(text) == versions


def test_uploads_are_read_from_the_shared_media_folder(fake_ls, tmp_path) -> None:
    media = tmp_path / "media"
    (media / "upload" / "3").mkdir(parents=True)
    (media / "upload" / "3" / "a b.png").write_bytes(png(6, 4))
    (tmp_path / "secret.png").write_bytes(png(6, 4))
    fake_ls.add_bytes("/data/upload/3/missing.png", png(5, 5))
    c = client(fake_ls, ls_media_root=str(media))
    for url in ("/data/upload/3/a%20b.png", "upload/3/a b.png", f"{fake_ls.url}/data/upload/3/a%20b.png"):
        assert c.read_image(url, 1).shape == (4, 6, 3)
    assert fake_ls.seen == []  # read from disk, not over HTTP
    assert c.read_image("/data/upload/3/missing.png", 2).shape == (5, 5, 3)  # not there: downloaded
    assert [p for p, _ in fake_ls.seen] == ["/data/upload/3/missing.png"]
    for bad in ("/data/upload/%2e%2e/%2e%2e/secret.png", "/data/upload/../secret.png"):
        with pytest.raises(ImageRefusedError, match="'..' is not allowed"):
            c.read_image(bad, 3)
    size = (media / "upload" / "3" / "a b.png").stat().st_size
    with pytest.raises(ImageRefusedError, match=f"{size} bytes is over the limit of 50 bytes"):
        client(fake_ls, ls_media_root=str(media), max_image_bytes=50).read_image("/data/upload/3/a b.png", 4)


def test_images_read_ahead_are_used_once_and_checked_like_downloads(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/a.png", png(20, 10, (0, 0, 200)))
    c = client(fake_ls, max_image_pixels=150)
    c.ahead.put("/data/upload/1/a.png", png(10, 10, (9, 9, 9)))
    assert tuple(c.read_image("/data/upload/1/a.png", 1)[0, 0]) == (9, 9, 9) and fake_ls.seen == []
    with pytest.raises(ImageRefusedError, match="200 pixels is over the limit of 150"):
        c.read_image("/data/upload/1/a.png", 1)  # taken already: downloaded, and the limit applies
    c.ahead.put("/data/upload/1/b.png", png(20, 10))
    with pytest.raises(ImageRefusedError, match="over the limit of 150"):
        c.read_image("/data/upload/1/b.png", 2)


def test_tasks_with_versions_follow_pages_when_the_server_caps_their_size(fake_ls) -> None:
    tasks = [
        {"id": i, "data": {"image": f"/data/upload/1/{i}.png"}, "predictions_model_versions": "m"}
        for i in (5, 6, 7)
    ]

    def capped(query, headers):  # like TASK_API_PAGE_SIZE_MAX=2
        selected = json.loads(query["query"][0])["selectedItems"]
        assert selected == {"all": False, "included": [5, 6, 7]}
        return _tasks_route(tasks)({**query, "page_size": ["2"]}, headers)

    fake_ls.add_handler("/api/tasks/", capped)
    states = client(fake_ls).tasks_with_versions(1, [7, 6, 5])
    assert [(s.task.id, s.versions) for s in states] == [(5, {"m"}), (6, {"m"}), (7, {"m"})]
    assert len(fake_ls.seen) == 2 and "page=2" in fake_ls.seen[1][0]
