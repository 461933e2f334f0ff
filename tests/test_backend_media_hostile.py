"""backend.labelstudio.media against hostile input: presigned reads only for the request's project, redirects
re-checked hop by hop with no credential leaving Label Studio's origin, local files and symbolic links,
references that are huge or not Unicode. Real HTTP servers on 127.0.0.1 and real symlinks."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from http_server import serving
from PIL import Image

from backend.errors import ImageFetchError, ImageRefusedError
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.media import MAX_REDIRECTS
from backend.settings import Settings

TOKEN = "legacy-token-123"


def png(w: int = 8, h: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 10)).save(buf, format="PNG")
    return buf.getvalue()


class Recorder:
    """A second HTTP server on 127.0.0.1 (another port: another origin): records each request's path and
    headers; ``routes`` maps a path to ``(status, headers, body)``."""

    def __init__(self) -> None:
        self.url = ""
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}


@contextmanager
def recorder() -> Iterator[Recorder]:
    state = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            state.seen.append((self.path, dict(self.headers.items())))
            status, headers, body = state.routes.get(self.path.split("?")[0], (404, {}, b"no"))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as url:
        state.url = url
        yield state


def project_tasks(members: dict[int, list[int]]):
    """Label Studio's task list as the Data Manager answers it: only the selected tasks of the project."""

    def handler(query: dict[str, list[str]], headers: dict[str, str]) -> tuple:
        project = int(query["project"][0])
        selected = json.loads(query["query"][0])["selectedItems"]["included"]
        tasks = [{"id": i, "data": {}} for i in selected if i in members.get(project, [])]
        body = {"tasks": tasks, "total": len(tasks), "total_annotations": 0, "total_predictions": 0}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()

    return handler


def client(fake_ls, **kw: Any) -> LabelStudioClient:
    base = dict(label_studio_url=fake_ls.url, label_studio_api_key=TOKEN)
    return LabelStudioClient(Settings(**{**base, **kw}))


def presigns_to(fake_ls, location: str, task: int = 9, cookie: bool = True) -> None:
    headers = {"Location": location}
    if cookie:  # what Label Studio's session middleware may add to any answer
        headers["Set-Cookie"] = "sessionid=ls-session-secret; Path=/; HttpOnly"
    fake_ls.add_bytes(f"/tasks/{task}/presign/", b"", status=303, headers=headers)


# -- presign: the request's project only ------------------------------------------------------------------


def test_a_presigned_read_carries_no_cookie_nor_token_to_another_port(fake_ls) -> None:
    fake_ls.add_handler("/api/tasks/", project_tasks({4: [9]}))
    with recorder() as cloud:
        cloud.routes["/bucket/a.png"] = (200, {"Set-Cookie": "cloud=1"}, png(7, 3))
        presigns_to(fake_ls, f"{cloud.url}/bucket/a.png?X-Amz-Signature=abc")
        img = client(fake_ls).read_image("s3://bucket/a.png", 9, project_id=4)
        assert img.shape == (3, 7, 3)
        assert len(cloud.seen) == 1
        path, headers = cloud.seen[0]
        assert path == "/bucket/a.png?X-Amz-Signature=abc"
        lowered = {k.lower() for k in headers}
        assert "cookie" not in lowered and "authorization" not in lowered
    presign = [h for p, h in fake_ls.seen if p.startswith("/tasks/9/presign/")]
    assert presign[0]["Authorization"] == f"Token {TOKEN}" and "Cookie" not in presign[0]


def test_a_task_of_another_project_is_not_presigned(fake_ls) -> None:
    fake_ls.add_handler("/api/tasks/", project_tasks({3: [9], 4: [10]}))
    presigns_to(fake_ls, f"{fake_ls.url}/never")
    c = client(fake_ls)
    with pytest.raises(ImageRefusedError, match="task 9 is not a task of project 4") as info:
        c.read_image("s3://bucket/a.png", 9, project_id=4)
    assert info.value.status == 422
    assert not any(p.startswith("/tasks/9/presign/") for p, _ in fake_ls.seen)
    listing = [p for p, _ in fake_ls.seen if p.startswith("/api/tasks/")]
    assert len(listing) == 1 and "project=4" in listing[0]


def test_without_the_request_project_a_cloud_uri_is_refused(fake_ls) -> None:
    presigns_to(fake_ls, f"{fake_ls.url}/never")
    with pytest.raises(ImageRefusedError, match="no project was given"):
        client(fake_ls).read_image("s3://bucket/a.png", 9)
    assert fake_ls.seen == []


def test_confirmed_tasks_are_remembered_and_confirmed_in_bulk(fake_ls) -> None:
    fake_ls.add_handler("/api/tasks/", project_tasks({4: [1, 2, 3]}))
    c = client(fake_ls)
    assert c.confirm_tasks(4, [1, 2, 3, 77]) == {1, 2, 3}
    n = len(fake_ls.seen)
    assert c.task_in_project(4, 2) and len(fake_ls.seen) == n  # remembered: no request
    assert not c.task_in_project(5, 2)  # another project is asked again
    assert len(fake_ls.seen) == n + 1


# -- redirects: each hop checked -----------------------------------------------------------------------


def test_a_redirect_back_to_label_studio_gets_the_token_and_other_hosts_never(fake_ls) -> None:
    fake_ls.add_handler("/api/tasks/", project_tasks({4: [9]}))
    fake_ls.add_bytes("/signed/a.png", png(5, 4))
    with recorder() as cloud:
        cloud.routes["/hop"] = (302, {"Location": f"{fake_ls.url}/signed/a.png"}, b"")
        presigns_to(fake_ls, f"{cloud.url}/hop")
        assert client(fake_ls).read_image("s3://b/a.png", 9, project_id=4).shape == (4, 5, 3)
        assert "Authorization" not in cloud.seen[0][1] and "Cookie" not in cloud.seen[0][1]
    signed = [h for p, h in fake_ls.seen if p == "/signed/a.png"]
    assert signed[0]["Authorization"] == f"Token {TOKEN}" and "Cookie" not in signed[0]


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("file:///etc/passwd", "a 'file' URL is not followed"),
        ("ftp://127.0.0.1/a.png", "a 'ftp' URL is not followed"),
        ("http://user:pw@127.0.0.1:1/a.png", "no credentials"),
        ("http://127.0.0.1:99999/a.png", "a valid port"),
        ("https://:443/a.png", "with a host"),
        ("http://127.0.0.1:1/" + "a" * 9000, "over the limit of 8192 characters"),
    ],
)
def test_redirects_to_what_a_first_request_may_not_reach_are_refused(fake_ls, location, message) -> None:
    fake_ls.add_handler("/api/tasks/", project_tasks({4: [9]}))
    presigns_to(fake_ls, location)
    with pytest.raises(ImageRefusedError, match=message) as info:
        client(fake_ls).read_image("s3://b/a.png", 9, project_id=4)
    assert "pw" not in str(info.value) and len(str(info.value)) < 400


def test_redirects_are_bounded(fake_ls) -> None:
    fake_ls.add_handler("/api/tasks/", project_tasks({4: [9]}))
    with recorder() as cloud:
        cloud.routes["/loop"] = (302, {"Location": "/loop"}, b"")
        presigns_to(fake_ls, f"{cloud.url}/loop")
        with pytest.raises(ImageRefusedError, match=f"more than {MAX_REDIRECTS} redirects"):
            client(fake_ls).read_image("s3://b/a.png", 9, project_id=4)
        assert len(cloud.seen) == MAX_REDIRECTS


def test_the_byte_limit_holds_at_the_last_hop_and_errors_hide_the_signed_url(fake_ls) -> None:
    fake_ls.add_handler("/api/tasks/", project_tasks({4: [9]}))
    with recorder() as cloud:
        cloud.routes["/big.png"] = (200, {}, b"x" * 5000)
        cloud.routes["/gone.png"] = (403, {}, b"expired")
        presigns_to(fake_ls, f"{cloud.url}/big.png?X-Amz-Signature=secret")
        with pytest.raises(ImageRefusedError, match="over the limit of 1000 bytes"):
            client(fake_ls, max_image_bytes=1000).read_image("s3://b/a.png", 9, project_id=4)
        presigns_to(fake_ls, f"{cloud.url}/gone.png?X-Amz-Signature=secret")
        with pytest.raises(ImageFetchError, match="presigned host '127.0.0.1:.*' answered HTTP 403") as info:
            client(fake_ls).read_image("s3://b/a.png", 9, project_id=4)
        assert "secret" not in str(info.value)


def test_media_redirects_are_still_not_followed(fake_ls) -> None:
    fake_ls.add_bytes(
        "/data/upload/1/r.png", b"", status=302, headers={"Location": "http://user:pw@example.com/x"}
    )
    with pytest.raises(ImageRefusedError, match="redirects are not followed") as info:
        client(fake_ls).read_image("/data/upload/1/r.png", 1)
    assert "pw" not in str(info.value)


# -- hostile references --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["/data/upload/3/\ud800.png", "s3://bucket/\ud800.png", "/data/local-files/?d=\udcff", "upload/\x00.png"],
)
def test_lone_surrogates_and_control_characters_are_refused_not_crashed(fake_ls, url: str) -> None:
    with pytest.raises(ImageRefusedError) as info:
        client(fake_ls).read_image(url, 1, project_id=1)
    str(info.value).encode("utf-8")
    assert fake_ls.seen == []


def test_a_huge_reference_is_refused_quickly_with_a_short_message(fake_ls) -> None:
    url = "/data/upload/1/" + "a" * 20_000_000
    t0 = time.perf_counter()
    with pytest.raises(ImageRefusedError, match="over the limit of 8192 characters") as info:
        client(fake_ls).read_image(url, 1)
    assert time.perf_counter() - t0 < 1.0
    assert len(str(info.value)) < 400 and "(20000015 chars)" in str(info.value)
    with pytest.raises(ImageFetchError) as info2:
        client(fake_ls).read_image({"image": "b" * 5_000_000}, 1)
    assert len(str(info2.value)) < 400
    assert fake_ls.seen == []


@pytest.mark.parametrize(
    "url",
    [
        "/data/local-filesX/?d=a.png",
        "/data/local-files/x/?d=a.png",
        "/data/uploadX/1/a.png",
        "/data/upload/",
        "/storage-data/uploadedX/?filepath=a.png",
        "/data/upload/%2e%2e/%2e%2e/secret.png",
        "/data/upload/1/%2E%2E/%2E%2E/secret.png",
    ],
)
def test_paths_are_compared_by_whole_segments(fake_ls, tmp_path, url: str) -> None:
    for c in (client(fake_ls), client(fake_ls, local_files_root=str(tmp_path), ls_media_root=str(tmp_path))):
        with pytest.raises(ImageRefusedError):
            c.read_image(url, 1)
    assert fake_ls.seen == []


# -- local files and the media folder: real paths below the root ----------------------------------------


@pytest.fixture
def tree(tmp_path):
    """root/ (the local-files root) with a storage ``st/``; secret files next to the root."""
    root = tmp_path / "root"
    (root / "st").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "st" / "a.png").write_bytes(png(8, 6))
    (root / "other" / "b.png").write_bytes(png(4, 2))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "s.png").write_bytes(png(3, 3))
    os.symlink(tmp_path / "secret" / "s.png", root / "st" / "out.png")
    os.symlink(tmp_path / "secret", root / "st" / "outdir")
    os.symlink("../other/b.png", root / "st" / "in.png")
    os.mkfifo(root / "st" / "fifo.png")
    return root


def test_a_symlink_out_of_the_local_files_root_is_refused(fake_ls, tree) -> None:
    c = client(fake_ls, local_files_root=str(tree))
    assert c.read_image("/data/local-files/?d=st/a.png", 1).shape == (6, 8, 3)
    assert c.read_image("/data/local-files/?d=st/in.png", 1).shape == (2, 4, 3)  # stays below the root
    for d in ("st/out.png", "st/outdir/s.png", "../secret/s.png", "st/../../secret/s.png"):
        with pytest.raises(ImageRefusedError, match="outside the local-files root") as info:
            c.read_image(f"/data/local-files/?d={d}", 1)
        assert str(tree.parent) not in str(info.value)  # no server path in a message
    assert fake_ls.seen == []


def test_a_decoded_nul_is_refused(fake_ls, tree) -> None:
    c = client(fake_ls, local_files_root=str(tree), ls_media_root=str(tree))
    for url in ("/data/local-files/?d=st/a.png%00.txt", "/data/upload/st/a.png%00"):
        with pytest.raises(ImageRefusedError, match="NUL"):
            c.read_image(url, 1)
    assert fake_ls.seen == []


def test_a_fifo_is_refused_without_blocking(fake_ls, tree) -> None:
    done: list[BaseException] = []

    def read() -> None:
        try:
            client(fake_ls, local_files_root=str(tree)).read_bytes("/data/local-files/?d=st/fifo.png", 1)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            done.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert isinstance(done[0], ImageRefusedError) and "not a regular file" in str(done[0])


def test_messages_name_the_reference_not_the_root(fake_ls, tree) -> None:
    c = client(fake_ls, local_files_root=str(tree))
    with pytest.raises(ImageFetchError, match="no such file below the local-files root") as info:
        c.read_image("/data/local-files/?d=st/missing.png", 1)
    assert str(tree) not in str(info.value) and "st/missing.png" in str(info.value)


def test_without_a_local_files_root_local_files_are_refused_not_downloaded(fake_ls) -> None:
    fake_ls.add_bytes("/data/local-files/", png(5, 5))
    with pytest.raises(ImageRefusedError, match="LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, which is not set"):
        client(fake_ls).read_image("/data/local-files/?d=st/out.png", 1)
    assert fake_ls.seen == []


def test_a_symlink_out_of_the_media_folder_is_refused_not_downloaded(fake_ls, tmp_path) -> None:
    media = tmp_path / "media"
    (media / "upload" / "3").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(png(3, 3))
    os.symlink(tmp_path / "secret.png", media / "upload" / "3" / "link.png")
    fake_ls.add_bytes("/data/upload/3/link.png", png(5, 5))
    with pytest.raises(ImageRefusedError, match="outside the media folder") as info:
        client(fake_ls, ls_media_root=str(media)).read_image("/data/upload/3/link.png", 1)
    assert str(tmp_path) not in str(info.value)
    assert fake_ls.seen == []


# -- read-ahead: bytes read for one project are not handed to another -----------------------------------


def test_images_read_ahead_are_kept_per_project(fake_ls) -> None:
    fake_ls.add_bytes("/data/upload/1/a.png", png(4, 4))
    c = client(fake_ls)
    assert c.read_ahead([("/data/upload/1/a.png", 1)], project_id=3) == 1
    assert not c.ahead.holds("/data/upload/1/a.png", 4) and c.ahead.holds("/data/upload/1/a.png", 3)
    assert c.ahead.take("/data/upload/1/a.png", 4) is None
    c.read_image("/data/upload/1/a.png", 1, project_id=3)
    assert not c.ahead.holds("/data/upload/1/a.png", 3)  # taken by the read of project 3
    assert len(fake_ls.seen) == 1
