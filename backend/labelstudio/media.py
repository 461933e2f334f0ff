"""Reading a task image: a security boundary, in one reviewable module.

Only these are read:

- ``/data/upload/...`` (or ``upload/...``) and ``/storage-data/uploaded/?filepath=...``: from the configured
  ``LABEL_STUDIO_URL``, with its token;
- ``/data/upload/<path>`` straight from disk when ``COSOD_LS_MEDIA_ROOT`` names Label Studio's media folder
  (shared read-only with this process, as in docker-compose.yml), only below that folder; a file missing
  there is downloaded as above, a file whose real path leaves the folder is refused;
- ``/data/local-files/?d=<rel>`` straight from disk below ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` (alias
  ``LOCAL_FILES_DOCUMENT_ROOT``; ``?d=`` is parsed and normalised as Label Studio's view does, by the SDK),
  only when its real path (symbolic links resolved) is below the root's real path, and only a regular file.
  Without that root such URLs are **refused**: Label Studio's own view serves a symbolic link in a storage
  wherever it leads, and this process cannot tell over HTTP;
- cloud URIs (``s3://``, ``gs://``, ``azure-blob://``) through Label Studio's presign endpoint for the task,
  only for a task that Label Studio lists in the request's project (``project_id``; see
  :meth:`MediaReader.read_bytes`), following at most :data:`MAX_REDIRECTS` redirects, each to an
  ``http(s)`` URL checked like a first request (length, characters, no credentials in it);
- ``http(s)://`` URLs whose origin (scheme, host, port) is the configured Label Studio's.

Everything else (other hosts, ``file://``, absolute paths, ``data:`` URIs, references over
:data:`~.urls.MAX_URL_CHARS` characters, lone surrogates, control characters, paths that only start like
a media path, such as ``/data/local-filesX/``) is refused with :class:`ImageRefusedError`. The byte limit is
enforced while reading, the pixel limit from the header, both before decoding; decoding itself is
``cosod.imageio.decode_image``.

Credentials: Label Studio's token goes only to Label Studio's origin. A redirect to any other origin (a
cloud host, or the same host on another port) is a new, bare request: no ``Authorization``, no cookie (no
cookie jar is kept across requests at all). Messages quote the task's reference through
:func:`backend.errors.quote` and never show a path of this server nor a presigned URL (only its host).

:func:`route` is the policy as a pure function of the reference and the settings (what to read, from where,
or why not); :class:`MediaReader` carries it out with the limits.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import numpy as np
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    encode_presign_fileuri,
    is_cloud_storage_uri,
    local_files_resolver,
    resolve_local_storage_file,
)
from PIL import Image

from cosod.imageio import decode_image

from ..errors import ImageFetchError, ImageRefusedError, quote
from ..settings import Settings
from .readahead import ImagesAhead
from .urls import DEFAULT_PORTS, host, origin, url_problem

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3  # hops followed from Label Studio's presign endpoint (it answers one 303)
ALLOWED = "only /data/upload/, /storage-data/uploaded/ and /data/local-files/ paths of Label Studio are read"


class _OneHop(requests.Session):
    """A session for one request that leaves redirects alone: :meth:`MediaReader._download` follows them
    itself, hop by hop, each hop checked and sent by a fresh session (so no cookie jar outlives a hop).
    Plain ``requests`` would still prepare the next hop (and fail on a bad Location) with
    ``allow_redirects=False``."""

    def resolve_redirects(self, *args: Any, **kwargs: Any) -> Iterator[Any]:  # type: ignore[override]
        return iter(())


@dataclass(frozen=True)
class Route:
    """Where a reference is read from: ``"download"`` (``target``: a path on Label Studio, sent with its
    token; ``follow_redirects`` only for presigned cloud URIs, and then ``project`` is the project the task
    must belong to), ``"local"`` (``target``: the local-files URL, resolved below
    ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``) or ``"media"`` (``target``: the upload's path below
    ``COSOD_LS_MEDIA_ROOT``, downloaded as ``fallback`` when the file is not there)."""

    kind: str
    target: str
    follow_redirects: bool = False
    fallback: str | None = None
    project: int | None = None


def route(url: str, settings: Settings, task_id: int | None = None, project_id: int | None = None) -> Route:
    """The read policy. Raises :class:`ImageRefusedError` for a reference it does not allow (the message
    quotes the reference and names the rule) and :class:`ImageFetchError` for a cloud URI without its task
    id. A cloud URI needs ``project_id``, the project of the request the read is for."""
    problem = url_problem(url)
    if problem:
        raise ImageRefusedError(f"{quote(url)}: {problem}")
    if url.startswith(("upload/", "/upload/")):
        url = "/data/" + url.lstrip("/")
    if is_cloud_storage_uri(url):
        if task_id is None:
            raise ImageFetchError(f"{quote(url)}: a cloud storage URI needs the task id to be presigned")
        if project_id is None:
            raise ImageRefusedError(
                f"{quote(url)}: a cloud storage URI is presigned only for a task of the request's project, "
                "and no project was given"
            )
        presign = f"/tasks/{task_id}/presign/?fileuri={encode_presign_fileuri(url)}"
        return Route("download", presign, follow_redirects=True, project=project_id)
    path = _on_label_studio(url, settings)
    parsed = urlsplit(path)
    if ".." in unquote(parsed.path).split("/"):
        raise ImageRefusedError(f"{quote(url)}: '..' is not allowed in a media path")
    kind = _media_kind(parsed.path)
    if kind is None:
        raise ImageRefusedError(f"{quote(url)}: {ALLOWED}")
    if kind == "local-files":
        if not settings.local_files_root:
            raise ImageRefusedError(
                f"{quote(url)}: Local Storage files are read only from disk, below "
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, which is not set for this backend; set it to Label "
                "Studio's LOCAL_FILES_DOCUMENT_ROOT, mounted read-only"
            )
        return Route("local", path)
    if kind == "upload" and settings.ls_media_root:
        return Route("media", parsed.path[len("/data/") :], fallback=path)
    return Route("download", path)


def _media_kind(path: str) -> str | None:
    """``"upload"``, ``"local-files"`` or ``"storage"`` by whole path segments (``/data/local-filesX/`` is
    none of them), or None."""
    segments = path.split("/")
    if segments[0] != "":
        return None
    head, rest = segments[1:3], segments[3:]
    if head == ["data", "upload"] and rest and rest[-1]:
        return "upload"
    if head == ["data", "local-files"] and not any(rest):
        return "local-files"
    if head == ["storage-data", "uploaded"] and not any(rest):
        return "storage"
    return None


def _on_label_studio(url: str, settings: Settings) -> str:
    """The path (and query) of ``url`` on Label Studio: an absolute URL must have Label Studio's origin;
    anything else must be a path starting with ``/``."""
    parsed = urlsplit(url)
    if parsed.scheme.lower() in DEFAULT_PORTS:
        if not settings.label_studio_url or origin(url) != origin(settings.label_studio_url):
            raise ImageRefusedError(
                f"{quote(url)}: the host {quote(host(url))} is not allowed; task images are read only "
                f"from Label Studio ({settings.label_studio_url or 'LABEL_STUDIO_URL is not set'}) "
                "or its local-files root"
            )
        return parsed.path + (f"?{parsed.query}" if parsed.query else "")
    if parsed.scheme or parsed.netloc or not url.startswith("/"):
        raise ImageRefusedError(
            f"{quote(url)}: not a Label Studio media URL; only uploads, local files, cloud "
            "storage through Label Studio and URLs on the Label Studio host are read"
        )
    return url


class MediaReader:
    """Reads task images under :func:`route` with the byte and pixel limits. ``auth_headers`` gives the
    headers of a request to Label Studio; ``ahead`` holds bytes the jobs read ahead of use;
    ``task_in_project(project_id, task_id)`` says whether Label Studio lists the task in the project (asked
    before a presigned read; without it no cloud URI is read)."""

    def __init__(
        self,
        settings: Settings,
        auth_headers: Callable[[], dict[str, str]],
        ahead: ImagesAhead,
        task_in_project: Callable[[int, int], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.auth_headers = auth_headers
        self.ahead = ahead
        self.task_in_project = task_in_project
        self._media_miss_logged = False

    def read_image(
        self, url: Any, task_id: int | None = None, *, project_id: int | None = None
    ) -> np.ndarray:
        """A task's image reference -> HxWx3 uint8 RGB. Raises ImageRefusedError (policy, limits),
        ImageFetchError (cannot get the bytes) or cosod's ImageReadError (not a decodable image).
        ``project_id``: see :meth:`read_bytes`."""
        if not isinstance(url, str) or not url:
            raise ImageFetchError(f"task {task_id}: no image reference in the task data (got {quote(url)})")
        data = self.ahead.take(url, project_id)
        if data is None:
            data = self.read_bytes(url, task_id, project_id=project_id)
        name = f"task {task_id} image {quote(url)}"
        self._check_pixels(data, name)
        return decode_image(
            data,
            max_bytes=self.settings.max_image_bytes,
            max_pixels=self.settings.max_image_pixels,
            name=name,
        )

    def read_bytes(self, url: str, task_id: int | None = None, *, project_id: int | None = None) -> bytes:
        """The bytes of a task's image reference, under :func:`route` and the byte limit.

        ``project_id`` is the project of the request (``/predict``'s ``project``, a job's project): a cloud
        URI is presigned only when Label Studio lists ``task_id`` in that project, otherwise
        :class:`ImageRefusedError`; without ``project_id`` a cloud URI is refused. Other references do not
        need it."""
        where = route(url, self.settings, task_id, project_id)
        if where.kind == "local":
            return self._read_local(where.target, url)
        if where.kind == "media":
            data = self._read_media(where.target, url)
            if data is not None:
                return data
            return self._download(where.fallback or "", url)
        if where.project is not None:
            self._check_task_project(task_id, where.project, url)
        return self._download(where.target, url, follow_redirects=where.follow_redirects)

    def _check_task_project(self, task_id: int | None, project_id: int, url: str) -> None:
        if task_id is None or self.task_in_project is None or not self.task_in_project(project_id, task_id):
            raise ImageRefusedError(
                f"{quote(url)}: task {task_id} is not a task of project {project_id} in Label Studio; a "
                "cloud storage URI is presigned only for a task of the request's project"
            )

    # -- from disk --------------------------------------------------------------------------------------
    def _read_local(self, url: str, shown: str) -> bytes:
        """A ``/data/local-files/?d=`` file below LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (``?d=`` parsed
        and normalised by the SDK as Label Studio's view does; where it leads is checked by
        :meth:`_read_below`)."""
        root = self.settings.local_files_root or ""

        def resolver(relative: str) -> str:  # relative to the root, as Label Studio's view takes it
            return os.path.normpath(relative).lstrip("/")

        try:
            with local_files_resolver(resolver):
                path = resolve_local_storage_file(url)
        except FileNotFoundError:  # no ?d= at all
            path = None
        if not path:
            raise ImageRefusedError(f"{quote(shown)}: a local-files URL needs the file's path in '?d='")
        data = self._read_below(root, path, shown, "local-files root")
        if data is None:
            raise ImageFetchError(f"{quote(shown)}: no such file below the local-files root")
        return data

    def _read_media(self, relative: str, shown: str) -> bytes | None:
        """An upload straight from Label Studio's media folder (``COSOD_LS_MEDIA_ROOT``); None when the file
        is not there (then it is downloaded)."""
        root = self.settings.ls_media_root or ""
        data = self._read_below(root, unquote(relative), shown, "media folder (COSOD_LS_MEDIA_ROOT)")
        if data is None and not self._media_miss_logged:
            self._media_miss_logged = True
            log.warning(
                "%s is not in COSOD_LS_MEDIA_ROOT=%s; downloading uploads instead", quote(shown), root
            )
        return data

    def _read_below(self, root: str, relative: str, shown: str, what: str) -> bytes | None:
        """The bytes of the regular file ``relative`` (to ``root``, or absolute) whose real path is below the
        real path of ``root``; None when there is no such file. A path that leaves the root (through ``..``
        or a symbolic link) or names no regular file is refused; the limit applies before reading."""
        if "\x00" in relative:  # decoded from %00; no file name holds one
            raise ImageRefusedError(f"{quote(shown)}: a NUL character in a file path")
        base = os.path.realpath(root)
        path = os.path.realpath(os.path.join(base, relative))
        if path == base or os.path.commonpath([path, base]) != base:
            raise ImageRefusedError(
                f"{quote(shown)}: the file is outside the {what} (a symbolic link may not lead out of it)"
            )
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageFetchError(
                f"{quote(shown)}: cannot read the file ({exc.strerror or 'error'})"
            ) from None
        limit = self.settings.max_image_bytes
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ImageRefusedError(f"{quote(shown)}: not a regular file in the {what}")
            if st.st_size > limit:
                raise ImageRefusedError(
                    f"{quote(shown)}: {st.st_size} bytes is over the limit of {limit} bytes"
                )
            try:
                data = fh.read(limit + 1)
            except OSError as exc:
                raise ImageFetchError(
                    f"{quote(shown)}: cannot read the file ({exc.strerror or 'error'})"
                ) from None
        if len(data) > limit:
            raise ImageRefusedError(
                f"{quote(shown)}: more than {limit} bytes, over the limit of {limit} bytes"
            )
        return data

    # -- over HTTP --------------------------------------------------------------------------------------
    def _download(self, path: str, shown: str, *, follow_redirects: bool = False) -> bytes:
        """``path`` from Label Studio with its token; with ``follow_redirects``, up to :data:`MAX_REDIRECTS`
        redirects, each hop a new request that carries the token only to Label Studio's origin."""
        s = self.settings
        if not s.label_studio_url:
            raise ImageFetchError(
                f"{quote(shown)}: LABEL_STUDIO_URL is not set, so Label Studio media cannot be read"
            )
        ls_origin = origin(s.label_studio_url)
        url = s.label_studio_url.rstrip("/") + "/" + path.lstrip("/")
        for hop in range(MAX_REDIRECTS + 1):
            on_ls = hop == 0 or (ls_origin is not None and origin(url) == ls_origin)
            where = "Label Studio" if on_ls else f"the presigned host {quote(host(url))}"
            try:
                with (
                    _OneHop() as session,
                    session.get(
                        url,
                        headers=self.auth_headers() if on_ls else {},
                        stream=True,
                        timeout=(5, s.http_timeout),
                        allow_redirects=False,
                    ) as resp,
                ):
                    if resp.is_redirect:
                        location = session.get_redirect_target(resp) or ""
                        if not follow_redirects:
                            raise ImageRefusedError(
                                f"{quote(shown)}: {where} redirected (to the host "
                                f"{quote(host(location))}); redirects are not followed for Label Studio "
                                "media"
                            )
                        url = _next_hop(url, location, shown)
                        continue
                    if resp.status_code >= 300:
                        raise ImageFetchError(f"{quote(shown)}: {where} answered HTTP {resp.status_code}")
                    return self._body(resp, shown)
            except requests.RequestException as exc:
                raise ImageFetchError(
                    f"{quote(shown)}: cannot download from {where} ({exc.__class__.__name__})"
                ) from None
        raise ImageRefusedError(f"{quote(shown)}: more than {MAX_REDIRECTS} redirects")

    def _body(self, resp: requests.Response, shown: str) -> bytes:
        limit = self.settings.max_image_bytes
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ImageRefusedError(f"{quote(shown)}: {declared} bytes is over the limit of {limit} bytes")
        buf = bytearray()
        for chunk in resp.iter_content(1 << 16):
            buf += chunk
            if len(buf) > limit:
                raise ImageRefusedError(
                    f"{quote(shown)}: more than {limit} bytes, over the limit of {limit} bytes"
                )
        return bytes(buf)

    def _check_pixels(self, data: bytes, name: str) -> None:
        """Refuse an image whose header announces more pixels than allowed (undecodable data passes on
        to decode_image, which reports it)."""
        if len(data) > self.settings.max_image_bytes:
            raise ImageRefusedError(
                f"{name}: {len(data)} bytes is over the limit of {self.settings.max_image_bytes} bytes"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    w, h = img.size
        except Image.DecompressionBombError:
            raise ImageRefusedError(
                f"{name}: over the limit of {self.settings.max_image_pixels} pixels"
            ) from None
        except Exception:
            return
        if w * h > self.settings.max_image_pixels:
            raise ImageRefusedError(
                f"{name}: {w}x{h} = {w * h} pixels is over the limit of "
                f"{self.settings.max_image_pixels} pixels"
            )


def _next_hop(current: str, location: str, shown: str) -> str:
    """The URL a redirect leads to, checked like a first request: at most MAX_URL_CHARS characters, no
    control character, http(s), a host, no credentials in it. The message never shows the URL (a presigned
    URL is a credential): only what is wrong with it."""
    problem = url_problem(location)
    if problem:
        raise ImageRefusedError(f"{quote(shown)}: a redirect's Location is refused: {problem}")
    target = urljoin(current, location)
    if origin(target) is None:
        raise ImageRefusedError(
            f"{quote(shown)}: a redirect to a {quote(urlsplit(target).scheme)} URL is not followed; only "
            "http(s) URLs with a host, a valid port and no credentials in them are"
        )
    return target
