"""``GET /health``: what is ready, and what is not and why, in words a user can act on.

**Can task images be read?** (:func:`image_access`) The backend reads a task's image from Label Studio over
HTTP (``/data/upload/...``, cloud storage, URLs on Label Studio's host: these need ``LABEL_STUDIO_URL`` and
``LABEL_STUDIO_API_KEY``), or from disk: ``/data/local-files/?d=...`` below
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``, uploads found in ``COSOD_LS_MEDIA_ROOT``. Other references (a
public ``http(s)`` URL of another host, ...) are refused whatever the settings (:mod:`..labelstudio.media`).
So with neither the pair URL + key nor one of the two folders, no task image can be read: ``/health`` is
not ready, ``NOT_CONFIGURED``, and names what to set. With a folder and no key it is ready (a local-files
project needs no key); ``label_studio`` then says what it cannot do. Label Studio calls ``/health`` before
``/setup``, so without a key the legacy token it sends in ``/setup`` never arrives: legacy tokens (off by
default in Label Studio 1.23) must be given as ``LABEL_STUDIO_API_KEY`` too.

**Where Label Studio shows it.** Label Studio 1.23.2 passes no response body of a failing ``/health`` or
``/setup`` on: its ML connector (``ml/api_connector.py``, ``MLApi._request``) keeps ``str()`` of requests'
``HTTPError``, ``"503 Server Error: <reason phrase> for url: <url>"``, and the connect dialog shows it after
"Can't connect to ML backend ..., health check failed. ... Additional info:" (``ml/serializers.py``,
``_validate_healthcheck``; ``_validate_setup`` for ``/setup``: "... Reason: ..."). So every error answer of
this backend carries its message as the HTTP reason phrase as well (:func:`status_line`).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import redact, redact_all
from ..settings import Settings

REASON_LIMIT = 240  # characters of a message kept in the status line
TOKEN_WHERE = (
    "a personal access token from Label Studio (user menu > Account & Settings > Personal Access Token > "
    "Create New Token; or the Legacy Token shown there when legacy tokens are enabled)"
)


def status_line(code: int, message: str) -> str:
    """``"<code> <message>"`` as an HTTP status line's code and reason phrase: printable ASCII only (other
    characters become ``?``; ``<`` and ``>`` are dropped, Label Studio shows the text as HTML), one line,
    at most :data:`REASON_LIMIT` characters."""
    text = re.sub(r"\s+", " ", message).strip()
    text = "".join(c if " " <= c <= "~" else "?" for c in text).replace("<", "").replace(">", "")
    if len(text) > REASON_LIMIT:
        text = text[: REASON_LIMIT - 3].rstrip() + "..."
    return f"{code} {text}" if text else str(code)


def image_access(settings: Settings) -> tuple[list[str], str | None]:
    """``(missing, note)``: ``missing`` names the settings without which no task image can be read (empty
    when some can); ``note`` says what cannot be read with what is set (None when everything can)."""
    url, key = settings.label_studio_url, settings.label_studio_api_key
    if url and key:
        return [], None
    absent = [name for name, value in (("LABEL_STUDIO_URL", url), ("LABEL_STUDIO_API_KEY", key)) if not value]
    folders = [
        "/data/local-files/ images below LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
        if settings.local_files_root
        else "",
        "uploads found in COSOD_LS_MEDIA_ROOT" if settings.ls_media_root else "",
    ]
    readable = " and ".join(f for f in folders if f)
    if readable:
        return [], (
            f"{' and '.join(absent)} not set: only {readable} are read; uploads (/data/upload/) not there, "
            "cloud storage and images on Label Studio's host are not, and a group is the tasks of one "
            f"request. Set {' and '.join(absent)} for those"
        )
    return absent, (
        f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not set, so no task image can be read "
        "(images uploaded to Label Studio, /data/upload/..., are downloaded from it with its token). Set "
        "LABEL_STUDIO_URL to Label Studio's address (e.g. http://localhost:8080) and LABEL_STUDIO_API_KEY "
        f"to {TOKEN_WHERE}, then restart the backend"
    )


def health_body(
    settings: Settings, loader: Any, redis_state: str | None, workers: Any
) -> tuple[dict[str, Any], int, str]:
    """``(body, HTTP status, reason)`` of ``GET /health``. ``redis_state``: None (not configured), "ok" or
    why not; ``workers()``: the live workers (only called when Redis answers)."""
    state = loader.state
    missing, note = image_access(settings)
    ready = state == "ready" and redis_state in (None, "ok") and not missing
    if state == "failed":
        status = "ERROR"
    elif missing:
        status = "NOT_CONFIGURED"
    elif state != "ready":
        status = "LOADING"
    else:
        status = "UP" if ready else "DEGRADED"
    body: dict[str, Any] = {
        "status": status,
        "ready": ready,
        "model_class": "CoSODModel",
        "backbone": settings.backbone,
        "device": settings.device,
        "redis": redis_state or "not configured",
        "queue": "rq" if settings.redis_url else "in-process",
        "label_studio": settings.label_studio_url or "not configured",
    }
    if missing:
        body["missing"] = missing
    if note:
        body["label_studio_access"] = note
    batch_reason = None
    if redis_state == "ok":
        count = body["workers"] = workers()
        if count is None:
            batch_reason = "the live workers could not be counted (Redis answered the ping, then not)"
        elif not count:
            batch_reason = (
                f"no cosod-worker is alive on queue {settings.queue_name!r}: batch jobs "
                "(POST /jobs/prelabel, fine-tunes) wait in the queue until one starts"
            )
    elif redis_state is not None:
        batch_reason = "Redis is unreachable: batch jobs can be neither queued nor run"
    elif state != "ready":
        batch_reason = "the pipeline is not loaded: in-process jobs wait for it"
    body["batch_ready"] = batch_reason is None
    body["batch"] = batch_reason or (
        f"{body['workers']} worker(s) on queue {settings.queue_name!r}" if redis_state else "in-process"
    )
    body["load_attempt"] = loader.attempt
    if state == "ready":
        body["pipeline_version"] = getattr(loader.pipeline, "version_id", None)
        body["load_seconds"] = round(loader.load_seconds or 0.0, 3)
    if loader.error:
        body["error"] = loader.error
    fix = loader.fix()
    if fix:
        body["fix"] = fix
    body = redact_all(body, settings.secrets, settings.private_paths)
    reasons = []
    if missing:
        reasons.append(
            f"{' and '.join(missing)} not set on the ML backend, so it cannot read task images: set "
            "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a personal access token: Account & Settings) and "
            "restart it"
        )
    if state == "failed":
        reasons.append(str(body.get("error")))
    elif state != "ready":
        reasons.append(f"the {settings.model_name} model is still loading; retry in a moment")
    if redis_state not in (None, "ok"):
        reasons.append(f"Redis {redact(str(redis_state), settings.secrets)}")
    code = 200 if ready else 503
    return body, code, status_line(code, "; ".join(reasons) if reasons else "OK")
