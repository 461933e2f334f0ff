"""Reading a task image: a security boundary, in one reviewable module.

Only these are read:

- ``/data/upload/...`` (or ``upload/...``), ``/storage-data/uploaded/?filepath=...`` and
  ``/data/local-files/?d=...``: from the configured ``LABEL_STUDIO_URL``, with its token;
- ``/data/local-files/?d=<rel>`` straight from disk when ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` is set,
  only below that root (the SDK's resolver does the normalisation);
- ``/data/upload/<path>`` straight from disk when ``COSOD_LS_MEDIA_ROOT`` names Label Studio's media folder
  (shared read-only with this process, as in docker-compose.yml), only below that folder; a file missing
  there is downloaded as above;
- cloud URIs (``s3://``, ``gs://``, ``azure-blob://``) through Label Studio's presign endpoint for the task;
- ``http(s)://`` URLs whose host is the configured Label Studio host.

Everything else (other hosts, ``file://``, absolute paths, ``data:`` URIs) is refused with
:class:`ImageRefusedError`. The byte limit is enforced while downloading, the pixel limit from the header,
both before decoding; decoding itself is ``cosod.imageio.decode_image``.

:func:`route` is the policy as a pure function of the reference and the settings (what to read, from where,
or why not); :class:`MediaReader` carries it out with the limits.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    encode_presign_fileuri,
    is_cloud_storage_uri,
    local_files_resolver,
    resolve_local_storage_file,
    safe_build_path,
)
from PIL import Image

from cosod.imageio import decode_image

from ..errors import ImageFetchError, ImageRefusedError
from ..settings import Settings
from .readahead import ImagesAhead

log = logging.getLogger(__name__)

MEDIA_PREFIXES = ("/data/upload/", "/storage-data/uploaded", "/data/local-files")


@dataclass(frozen=True)
class Route:
    """Where a reference is read from: ``"download"`` (``target``: a path on Label Studio, sent with its
    token; ``follow_redirects`` only for presigned cloud URIs), ``"local"`` (``target``: the local-files URL,
    resolved below ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``) or ``"media"`` (``target``: the upload's path
    below ``COSOD_LS_MEDIA_ROOT``, downloaded as ``fallback`` when the file is not there)."""

    kind: str
    target: str
    follow_redirects: bool = False
    fallback: str | None = None


def route(url: str, settings: Settings, task_id: int | None = None) -> Route:
    """The read policy. Raises :class:`ImageRefusedError` for a reference it does not allow (the message
    says what is allowed) and :class:`ImageFetchError` for a cloud URI without its task id."""
    if url.startswith(("upload/", "/upload/")):
        url = "/data/" + url.lstrip("/")
    if is_cloud_storage_uri(url):
        if task_id is None:
            raise ImageFetchError(f"{url}: a cloud storage URI needs the task id to be presigned")
        presign = f"/tasks/{task_id}/presign/?fileuri={encode_presign_fileuri(url)}"
        return Route("download", presign, follow_redirects=True)
    path = _on_label_studio(url, settings)
    parsed = urlparse(path)
    if ".." in parsed.path.split("/"):
        raise ImageRefusedError(f"{url}: '..' is not allowed in a media path")
    if parsed.path.startswith("/data/local-files") and settings.local_files_root:
        return Route("local", path)
    if not parsed.path.startswith(MEDIA_PREFIXES):
        raise ImageRefusedError(
            f"{url}: only /data/upload/, /storage-data/uploaded/ and /data/local-files/ "
            "paths of Label Studio are read"
        )
    if parsed.path.startswith("/data/upload/") and settings.ls_media_root:
        return Route("media", parsed.path[len("/data/") :], fallback=path)
    return Route("download", path)


def _on_label_studio(url: str, settings: Settings) -> str:
    """The path (and query) of ``url`` on Label Studio: an absolute URL must be on its host; anything else
    must be a path starting with ``/``."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        ls = urlparse(settings.label_studio_url or "")
        if not settings.label_studio_url or (parsed.scheme, parsed.netloc) != (ls.scheme, ls.netloc):
            raise ImageRefusedError(
                f"{url}: the host {parsed.netloc!r} is not allowed; task images are read only from "
                f"Label Studio ({settings.label_studio_url or 'LABEL_STUDIO_URL is not set'}) "
                "or its local-files root"
            )
        return parsed.path + (f"?{parsed.query}" if parsed.query else "")
    if parsed.scheme or parsed.netloc or not url.startswith("/"):
        raise ImageRefusedError(
            f"{url}: not a Label Studio media URL; only uploads, local files, cloud "
            "storage through Label Studio and URLs on the Label Studio host are read"
        )
    return url


class MediaReader:
    """Reads task images under :func:`route` with the byte and pixel limits. ``auth_headers`` gives the
    headers of a request to Label Studio; ``ahead`` holds bytes the jobs read ahead of use."""

    def __init__(
        self, settings: Settings, auth_headers: Callable[[], dict[str, str]], ahead: ImagesAhead
    ) -> None:
        self.settings = settings
        self.auth_headers = auth_headers
        self.ahead = ahead
        self._media_miss_logged = False

    def read_image(self, url: Any, task_id: int | None = None) -> np.ndarray:
        """A task's image reference -> HxWx3 uint8 RGB. Raises ImageRefusedError (policy, limits),
        ImageFetchError (cannot get the bytes) or cosod's ImageReadError (not a decodable image)."""
        if not isinstance(url, str) or not url:
            raise ImageFetchError(f"task {task_id}: no image reference in the task data (got {url!r})")
        data = self.ahead.take(url)
        if data is None:
            data = self.read_bytes(url, task_id)
        name = f"task {task_id} image {url}"
        self._check_pixels(data, name)
        return decode_image(
            data,
            max_bytes=self.settings.max_image_bytes,
            max_pixels=self.settings.max_image_pixels,
            name=name,
        )

    def read_bytes(self, url: str, task_id: int | None = None) -> bytes:
        """The bytes of a task's image reference, under :func:`route` and the byte limit."""
        where = route(url, self.settings, task_id)
        if where.kind == "local":
            return self._read_local(where.target)
        if where.kind == "media":
            data = self._read_media(where.target, url)
            if data is not None:
                return data
            return self._download(where.fallback or "", url)
        return self._download(where.target, url, follow_redirects=where.follow_redirects)

    def _read_local(self, url: str) -> bytes:
        root = os.path.abspath(self.settings.local_files_root or "")

        def resolver(relative: str) -> str | None:
            try:
                return safe_build_path(root, os.path.normpath(relative).lstrip("/"))
            except ValueError:
                return None

        try:
            with local_files_resolver(resolver):
                path = resolve_local_storage_file(url)
        except FileNotFoundError as exc:
            raise ImageRefusedError(f"{url}: outside the local-files root {root} ({exc})") from None
        if path is None or not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
            raise ImageRefusedError(f"{url}: outside the local-files root {root}")
        return self._read_file(path, url)

    def _read_media(self, relative: str, shown: str) -> bytes | None:
        """An upload straight from Label Studio's media folder (``COSOD_LS_MEDIA_ROOT``); None when the file
        is not there (then it is downloaded). Only files below that folder are read."""
        root = os.path.realpath(self.settings.ls_media_root or "")
        path = os.path.realpath(os.path.join(root, unquote(relative)))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            if not self._media_miss_logged:
                self._media_miss_logged = True
                log.warning("%s is not in COSOD_LS_MEDIA_ROOT=%s; downloading uploads instead", shown, root)
            return None
        return self._read_file(path, shown)

    def _read_file(self, path: str, shown: str) -> bytes:
        """A file's bytes, refused over the byte limit before reading."""
        try:
            size = os.path.getsize(path)
            if size > self.settings.max_image_bytes:
                raise ImageRefusedError(
                    f"{shown}: {size} bytes is over the limit of {self.settings.max_image_bytes} bytes"
                )
            with open(path, "rb") as fh:
                return fh.read()
        except ImageRefusedError:  # a PermissionError, so an OSError too
            raise
        except OSError as exc:
            raise ImageFetchError(f"{shown}: cannot read the local file ({exc.strerror or exc})") from None

    def _download(self, path: str, shown: str, *, follow_redirects: bool = False) -> bytes:
        s = self.settings
        if not s.label_studio_url:
            raise ImageFetchError(
                f"{shown}: LABEL_STUDIO_URL is not set, so Label Studio media cannot be read"
            )
        target = s.label_studio_url.rstrip("/") + "/" + path.lstrip("/")
        headers = self.auth_headers()
        try:
            with requests.get(
                target,
                headers=headers,
                stream=True,
                timeout=(5, s.http_timeout),
                allow_redirects=follow_redirects,
            ) as resp:
                if resp.status_code >= 400:
                    raise ImageFetchError(f"{shown}: Label Studio answered HTTP {resp.status_code}")
                if 300 <= resp.status_code < 400:
                    raise ImageRefusedError(
                        f"{shown}: Label Studio redirected to "
                        f"{resp.headers.get('Location')!r}; redirects are not followed"
                    )
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > s.max_image_bytes:
                    raise ImageRefusedError(
                        f"{shown}: {declared} bytes is over the limit of {s.max_image_bytes} bytes"
                    )
                buf = bytearray()
                for chunk in resp.iter_content(1 << 16):
                    buf += chunk
                    if len(buf) > s.max_image_bytes:
                        raise ImageRefusedError(
                            f"{shown}: more than {s.max_image_bytes} bytes, over the limit of "
                            f"{s.max_image_bytes} bytes"
                        )
                return bytes(buf)
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"{shown}: cannot download from Label Studio ({exc.__class__.__name__})"
            ) from None

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
        except Image.DecompressionBombError as exc:
            raise ImageRefusedError(
                f"{name}: over the limit of {self.settings.max_image_pixels} pixels ({exc})"
            ) from None
        except Exception:
            return
        if w * h > self.settings.max_image_pixels:
            raise ImageRefusedError(
                f"{name}: {w}x{h} = {w * h} pixels is over the limit of "
                f"{self.settings.max_image_pixels} pixels"
            )
