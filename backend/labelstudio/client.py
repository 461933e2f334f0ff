"""Label Studio through label-studio-sdk: a project's tasks (cached), predictions pushed in bulk, and the
task images (read under the policy of :mod:`backend.labelstudio.media`).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import requests

from cosod.errors import ImageReadError

from ..errors import (
    LabelStudioError,
    LabelStudioUnavailableError,
    UnknownProjectError,
    quote,
)
from ..grouping import TaskRef
from ..settings import Settings
from .media import MediaReader
from .readahead import ImagesAhead

log = logging.getLogger(__name__)

NO_SDK_RETRY: Any = {"max_retries": 0}  # the job functions retry Label Studio calls with their own backoff


IDS_PER_REQUEST = 200  # task ids per Data Manager list request (they travel in the URL's query)
VERSIONS_TEXT_LIMIT = 500  # Label Studio cuts the predictions_model_versions column's text at 500 chars
KNOWN_MEMBERS = 100_000  # (project, task) pairs remembered as confirmed; then the memory starts afresh


@dataclass(frozen=True)
class TaskState:
    """A task and the model versions of its predictions (None: unknown, ask per task)."""

    task: TaskRef
    versions: frozenset[str] | None

    def has(self, model_version: str) -> bool | None:
        return None if self.versions is None else model_version in self.versions


def parse_versions(text: Any) -> frozenset[str] | None:
    """The Data Manager's ``predictions_model_versions`` text (``"a,b"`` on SQLite, ``"a, b"`` on
    PostgreSQL, ``""`` for none) as a set; None when absent or possibly cut at the length limit.

    Label Studio cuts the text before it removes the quotes PostgreSQL's form has (two per version), so
    the length before that removal is bounded from above by the length plus two per comma, plus two."""
    if not isinstance(text, str) or len(text) + 2 * text.count(",") + 2 >= VERSIONS_TEXT_LIMIT:
        return None
    return frozenset(v.strip() for v in text.split(",") if v.strip())


def _sdk_error(exc: Exception, what: str, base_url: str | None, project_id: int | None = None) -> Exception:
    """Map an SDK/HTTP exception to UnknownProjectError, LabelStudioUnavailableError or LabelStudioError."""
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, LabelStudioError):  # already ours (e.g. no URL or key configured)
        return exc
    if isinstance(exc, ApiError):
        code = exc.status_code or 0
        if code == 404 and project_id is not None:
            return UnknownProjectError(f"Label Studio has no project {project_id}")
        if code >= 500 or code in (408, 429):
            return LabelStudioUnavailableError(f"{what} failed: Label Studio answered HTTP {code}")
        return LabelStudioError(f"{what} failed: HTTP {code}: {quote(exc.body)}")
    if isinstance(exc, (requests.RequestException, OSError)) or type(exc).__module__.startswith("httpx"):
        return LabelStudioUnavailableError(
            f"{what} failed: Label Studio at {base_url} is unreachable "
            f"({exc.__class__.__name__}: {quote(str(exc))})"
        )
    return LabelStudioError(f"{what} failed: {exc.__class__.__name__}: {quote(str(exc))}")


class LabelStudioClient:
    """One per process. ``api_key`` is ``LABEL_STUDIO_API_KEY`` (legacy token or personal access token);
    without it, the legacy token from the latest ``/setup`` is used (see :meth:`offer_token`)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._fallback_token: str | None = None
        self._sdk: Any = None
        self._sdk_token: str | None = None
        self._tasks: dict[int, tuple[float, list[TaskRef]]] = {}
        self._listing: dict[int, threading.Lock] = {}  # one listing at a time per project
        self.ahead = ImagesAhead()  # bytes read ahead of use by the jobs (.readahead)
        self.media = MediaReader(settings, self.auth_headers, self.ahead, self.task_in_project)
        self._members: set[tuple[int, int]] = set()  # (project, task) pairs Label Studio confirmed
        self.list_calls = 0

    # -- auth -----------------------------------------------------------------------------------------
    @property
    def configured(self) -> bool:
        return bool(
            self.settings.label_studio_url and (self.settings.label_studio_api_key or self._fallback_token)
        )

    def offer_token(self, token: str | None) -> None:
        """The legacy token LS sends in ``/setup``; used only when no API key is configured."""
        if token and not self.settings.label_studio_api_key and token != self._fallback_token:
            with self._lock:
                self._fallback_token = token
                self._sdk = None

    def sdk(self) -> Any:
        """The SDK client (it exchanges a personal access token for short-lived access tokens itself)."""
        token = self.settings.label_studio_api_key or self._fallback_token
        if not self.settings.label_studio_url or not token:
            raise LabelStudioError(
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY must be set to reach Label Studio"
            )
        with self._lock:
            if self._sdk is None or self._sdk_token != token:
                from label_studio_sdk.client import LabelStudio

                # A new connection per request: Label Studio's development server (`label-studio start`)
                # stalls each reply on a reused connection by 40 ms (Nagle against delayed ACKs), more
                # than a new connection costs against any server.
                http = httpx.Client(
                    timeout=self.settings.http_timeout, limits=httpx.Limits(max_keepalive_connections=0)
                )
                try:
                    self._sdk = LabelStudio(
                        base_url=self.settings.label_studio_url,
                        api_key=token,
                        timeout=self.settings.http_timeout,
                        httpx_client=http,
                    )
                except Exception as exc:  # an expired PAT raises here
                    raise LabelStudioError(f"cannot use LABEL_STUDIO_API_KEY: {quote(str(exc))}") from None
                self._sdk_token = token
            return self._sdk

    def warm(self) -> None:
        """Build the SDK client and import what the job functions use (about a second), so that the first
        job does not pay for it. A no-op without LABEL_STUDIO_URL and an API key."""
        if not self.configured:
            return
        from label_studio_sdk import PredictionRequest  # noqa: F401 - imported for its import cost

        try:
            self.auth_headers()
        except LabelStudioError as exc:
            log.warning("Label Studio client: %s", exc)

    def auth_headers(self) -> dict[str, str]:
        """``Authorization: Token <legacy>`` or ``Bearer <fresh access token>``, as the SDK builds it."""
        try:
            headers = self.sdk()._client_wrapper.get_headers()
        except LabelStudioError:
            return {}
        except Exception as exc:  # token refresh failed
            raise LabelStudioError(f"Label Studio refused the API key: {quote(str(exc))}") from None
        return {"Authorization": headers["Authorization"]} if "Authorization" in headers else {}

    # -- tasks ----------------------------------------------------------------------------------------
    def project_tasks(
        self,
        project_id: int,
        *,
        refresh: bool = False,
        since: float | None = None,
        sdk_retries: int | None = None,
    ) -> list[TaskRef]:
        """All tasks of a project (id and data), cached for ``COSOD_TASK_LIST_TTL`` seconds; ``refresh``
        lists them again. Listings of one project run one at a time, and with ``since`` (a
        ``time.monotonic()`` reading, e.g. when the request arrived) a refresh takes a list whose listing
        started at or after it: a burst of requests that waited for one listing shares the next one, and no
        request gets a list older than itself. ``sdk_retries=0`` turns off the SDK's own retries (the jobs
        retry with their own backoff)."""
        with self._lock:
            project_lock = self._listing.setdefault(project_id, threading.Lock())
        with project_lock:
            now = time.monotonic()
            with self._lock:
                hit = self._tasks.get(project_id)
            if hit is not None:
                if not refresh and now - hit[0] < self.settings.task_list_ttl:
                    return hit[1]
                if since is not None and hit[0] >= since:
                    return hit[1]
            return self._list_project(project_id, now, sdk_retries)

    def _list_project(self, project_id: int, now: float, sdk_retries: int | None) -> list[TaskRef]:
        from label_studio_sdk.core.api_error import ApiError

        self.sdk()  # not configured: that LabelStudioError as it is, not "unreachable"
        try:
            options = {"max_retries": sdk_retries} if sdk_retries is not None else None
            listed = self._list_tasks(options, project=project_id, fields="task_only", page_size=500)
            tasks = [TaskRef(int(t.id), dict(t.data or {})) for t in listed]
        except ApiError as exc:
            if exc.status_code == 404:
                raise UnknownProjectError(f"Label Studio has no project {project_id}") from None
            if (exc.status_code or 0) >= 500:
                raise LabelStudioUnavailableError(
                    f"listing the tasks of project {project_id} failed: HTTP {exc.status_code}"
                ) from None
            raise LabelStudioError(
                f"listing the tasks of project {project_id} failed: HTTP {exc.status_code}"
            ) from None
        except (requests.RequestException, OSError) as exc:
            raise LabelStudioUnavailableError(
                f"cannot reach Label Studio at {self.settings.label_studio_url}: {quote(str(exc))}"
            ) from None
        except Exception as exc:  # httpx errors and the like
            raise _sdk_error(
                exc, f"listing the tasks of project {project_id}", self.settings.label_studio_url
            ) from None
        self.list_calls += 1
        with self._lock:
            self._tasks[project_id] = (now, tasks)
        return tasks

    def _list_tasks(self, request_options: Any, **params: Any) -> list[Any]:
        """Every task a task-list request matches, page after page until the answer's total (the SDK's own
        pager asks for one page more than there is)."""
        client = self.sdk()
        out: list[Any] = []
        number = 1
        while True:
            page = client.tasks.list(page=number, request_options=request_options, **params)
            items = list(page.items or [])
            out.extend(items)
            total = getattr(page.response, "total", None)
            if not items or not isinstance(total, int) or len(out) >= total:
                return out
            number += 1

    def label_config(self, project_id: int) -> str:
        """The project's label config XML, from Label Studio (UnknownProjectError when it has none)."""
        try:
            project = self.sdk().projects.get(id=project_id, request_options=NO_SDK_RETRY)
        except Exception as exc:
            raise _sdk_error(
                exc, f"reading project {project_id}", self.settings.label_studio_url, project_id
            ) from None
        return str(project.label_config or "")

    def tasks_with_versions(self, project_id: int, task_ids: Sequence[int]) -> list[TaskState]:
        """The project's tasks among ``task_ids`` (id and data, sorted by id; deleted ones are left out),
        each with the model versions of its predictions: one request per ``IDS_PER_REQUEST`` ids.

        This is the Data Manager's task list restricted to the ids (``selectedItems``) and ordered by its
        ``predictions_model_versions`` column, which makes Label Studio compute that column. Label Studio
        cuts the column's text at ``VERSIONS_TEXT_LIMIT`` characters; a task whose text may have been cut,
        or a server that leaves the column out, gets ``versions=None`` (ask :meth:`task_has_prediction`)."""
        out: dict[int, TaskState] = {}
        include = "id,data,predictions_model_versions"
        for t in self._selected(project_id, task_ids, include, ["tasks:predictions_model_versions"]):
            versions = parse_versions(getattr(t, "predictions_model_versions", None))
            out[int(t.id)] = TaskState(TaskRef(int(t.id), dict(t.data or {})), versions)
        return [out[i] for i in sorted(out)]

    def _selected(
        self, project_id: int, task_ids: Iterable[int], include: str, ordering: list[str] | None = None
    ) -> list[Any]:
        """The tasks among ``task_ids`` that Label Studio lists in the project (the Data Manager's list
        restricted to the ids with ``selectedItems``, which it applies within the project): one request per
        ``IDS_PER_REQUEST`` ids, only the fields in ``include``."""
        ids = sorted({int(i) for i in task_ids})
        out: list[Any] = []
        self.sdk()  # not configured: that LabelStudioError as it is
        for start in range(0, len(ids), IDS_PER_REQUEST):
            chunk = ids[start : start + IDS_PER_REQUEST]
            selection: dict[str, Any] = {"selectedItems": {"all": False, "included": chunk}}
            if ordering:
                selection["ordering"] = ordering
            try:  # one page holds the chunk unless the server caps page sizes (TASK_API_PAGE_SIZE_MAX)
                listed = self._list_tasks(
                    NO_SDK_RETRY,
                    project=project_id,
                    fields="task_only",
                    include=include,
                    query=json.dumps(selection),
                    page_size=len(chunk),
                )
            except Exception as exc:
                raise _sdk_error(
                    exc,
                    f"listing {len(chunk)} tasks of project {project_id}",
                    self.settings.label_studio_url,
                    project_id,
                ) from None
            wanted = set(chunk)
            out.extend(t for t in listed if t.id is not None and int(t.id) in wanted)
        return out

    def confirm_tasks(self, project_id: int, task_ids: Iterable[int]) -> frozenset[int]:
        """The ids among ``task_ids`` that Label Studio lists in project ``project_id`` (one request per
        ``IDS_PER_REQUEST`` ids not confirmed before; a task never moves to another project, so a
        confirmation is remembered). Callers that read many cloud images may call it once for all of them
        before the reads; :meth:`task_in_project` asks for one task."""
        ids = {int(i) for i in task_ids}
        with self._lock:
            known = {i for i in ids if (project_id, i) in self._members}
        found = {int(t.id) for t in self._selected(project_id, ids - known, "id")} if ids - known else set()
        with self._lock:
            if len(self._members) + len(found) > KNOWN_MEMBERS:
                self._members.clear()
            self._members.update((project_id, i) for i in found)
        return frozenset(known | found)

    def task_in_project(self, project_id: int, task_id: int) -> bool:
        """Whether Label Studio lists task ``task_id`` in project ``project_id`` (asked before a cloud URI of
        the task is presigned for a request of that project)."""
        return int(task_id) in self.confirm_tasks(project_id, [task_id])

    def import_predictions(self, project_id: int, predictions: Sequence[Mapping[str, Any]]) -> int:
        """Store many predictions in one request (``projects.import_predictions``; each item has ``task``,
        ``result``, ``score`` and ``model_version``). Label Studio checks every item before it stores any
        and stores them in one transaction: all or none. Returns the number created."""
        from label_studio_sdk import PredictionRequest

        if not predictions:
            return 0
        request = [PredictionRequest(**dict(p)) for p in predictions]
        try:
            resp = self.sdk().projects.import_predictions(
                id=project_id, request=request, request_options=NO_SDK_RETRY
            )
        except Exception as exc:
            raise _sdk_error(
                exc,
                f"importing {len(request)} predictions into project {project_id}",
                self.settings.label_studio_url,
                project_id,
            ) from None
        return int(resp.created or 0)

    def task_has_prediction(self, task_id: int, model_version: str) -> bool:
        """Whether the task has a prediction of ``model_version`` (one small request per task)."""
        try:
            preds = self.sdk().predictions.list(task=task_id, request_options=NO_SDK_RETRY)
        except Exception as exc:
            raise _sdk_error(
                exc, f"listing the predictions of task {task_id}", self.settings.label_studio_url
            ) from None
        return any(p.model_version == model_version for p in preds)

    def create_prediction(
        self, task_id: int, result: list[dict[str, Any]], score: float, model_version: str
    ) -> int:
        """Store one prediction on a task (``predictions.create``); returns its id."""
        try:
            pred = self.sdk().predictions.create(
                task=task_id,
                result=result,
                score=score,
                model_version=model_version,
                request_options=NO_SDK_RETRY,
            )
        except Exception as exc:
            raise _sdk_error(
                exc, f"creating a prediction for task {task_id}", self.settings.label_studio_url
            ) from None
        return int(pred.id or 0)

    def ping(self) -> None:
        """Raise LabelStudioUnavailableError when Label Studio's /health does not answer 200."""
        url = (self.settings.label_studio_url or "").rstrip("/") + "/health"
        try:
            resp = requests.get(url, timeout=5)
        except requests.RequestException as exc:
            raise LabelStudioUnavailableError(
                f"Label Studio at {self.settings.label_studio_url} is unreachable ({exc.__class__.__name__})"
            ) from None
        if resp.status_code != 200:
            raise LabelStudioUnavailableError(
                f"Label Studio at {self.settings.label_studio_url} answered HTTP {resp.status_code} "
                "on /health"
            )

    def forget_project(self, project_id: int) -> None:
        with self._lock:
            self._tasks.pop(project_id, None)

    # -- images (the read policy is backend.labelstudio.media) -----------------------------------------
    def read_image(
        self, url: Any, task_id: int | None = None, *, project_id: int | None = None
    ) -> np.ndarray:
        """A task's image reference -> HxWx3 uint8 RGB (see :meth:`MediaReader.read_image`). ``project_id``
        is the project of the request the read is for; a cloud URI is refused without it, and read only for
        a task Label Studio lists in that project."""
        return self.media.read_image(url, task_id, project_id=project_id)

    def read_bytes(self, url: str, task_id: int | None = None, *, project_id: int | None = None) -> bytes:
        """A task's image reference -> its bytes, under the read policy (:func:`~.media.route`);
        ``project_id`` as for :meth:`read_image`."""
        return self.media.read_bytes(url, task_id, project_id=project_id)

    def read_ahead(self, refs: Iterable[tuple[str, int | None]], *, project_id: int | None = None) -> int:
        """Read ``(reference, task id)`` pairs ahead of use for a request of ``project_id`` (kept for reads
        with that same ``project_id``); see :meth:`ImagesAhead.fill`."""
        read = functools.partial(self.read_bytes, project_id=project_id)
        return self.ahead.fill(refs, read, project_id)


__all__ = [
    "ImageReadError",
    "LabelStudioClient",
    "LabelStudioUnavailableError",
    "TaskState",
    "parse_versions",
]
