"""Every exception of the backend, and the one place that makes untrusted values and secrets safe to show.

Those under :class:`BackendError` map to one HTTP status each; all carry an actionable message.

Messages and log lines quote what a client sent with :func:`quote` (a bounded ``repr``: a 20 MB string or a
10,000-deep list becomes at most :data:`QUOTE_CHARS` characters, a lone surrogate an escape), and name a URL
with :func:`redact_url` (no password). The API passes every message it answers with through
:func:`redact`, which also blanks the configured secrets (Redis password, Label Studio key, basic-auth
password) wherever they appear.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

QUOTE_CHARS = 160  # the most characters of a client's value a message or a log line repeats

_repr = reprlib.Repr()
_repr.maxstring = QUOTE_CHARS
_repr.maxother = QUOTE_CHARS
_repr.maxlevel = 3
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#@\s]*)@")


def quote(value: Any) -> str:
    """``repr(value)``, bounded: long strings and containers are cut (reprlib), deep nesting is elided, and
    the result is at most about :data:`QUOTE_CHARS` characters, with the full length of a cut string."""
    text = _repr.repr(value)
    if isinstance(value, str | bytes) and len(value) > QUOTE_CHARS:
        text += f" ({len(value)} chars)"
    return text[: 2 * QUOTE_CHARS]


def brief(message: str, limit: int = 2 * QUOTE_CHARS) -> str:
    """A message cut to ``limit`` characters (for messages that may embed a value nobody quoted)."""
    return message if len(message) <= limit else f"{message[:limit]}… ({len(message)} chars)"


def redact_url(url: str) -> str:
    """``url`` without the password of its userinfo (``redis://:secret@host`` -> ``redis://:***@host``)."""
    return _URL_USERINFO.sub(lambda m: m.group(1) + _blank_password(m.group(2)) + "@", url)


def _blank_password(userinfo: str) -> str:
    user, sep, _ = userinfo.partition(":")
    return f"{user}:***" if sep else "***"


def redact(text: str, secrets: Iterable[str | None] = (), paths: Mapping[str, str] | None = None) -> str:
    """``text`` with every URL's password and every one of ``secrets`` (those of 4 or more characters)
    replaced by ``***``, and each of ``paths`` (a server folder -> the name to show, e.g. ``MODEL_DIR``)
    replaced by its name, longest first."""
    text = redact_url(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    for folder in sorted(paths or {}, key=len, reverse=True):
        if len(folder) > 1:
            text = text.replace(folder, (paths or {})[folder])
    return text


def redact_all(value: Any, secrets: Iterable[str | None] = (), paths: Mapping[str, str] | None = None) -> Any:
    """:func:`redact` applied to every string inside a JSON-like value (dicts, lists, strings)."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return redact(value, secrets, paths)
    if isinstance(value, dict):
        return {k: redact_all(v, secrets, paths) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_all(v, secrets, paths) for v in value]
    return value


class BackendError(Exception):
    """Base class; ``status`` is the HTTP status the app answers with when this reaches a route."""

    status = 500

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class BadRequestError(BackendError, ValueError):
    """A request body that is not what the protocol says (malformed JSON, missing ``tasks``...)."""

    status = 400


class LabelConfigError(BadRequestError):
    """A label config without a control this backend can fill; the message names the tag to add."""


class UnknownProjectError(BackendError, LookupError):
    """A project Label Studio does not know, or one this process has no label config for."""

    status = 404


class NotReadyError(BackendError):
    """The backbone is still loading, or failed to load (the message says which and why)."""

    status = 503


class ImageRefusedError(BackendError, PermissionError):
    """A task image this backend will not read: a URL outside the allowed hosts, or over a size limit."""

    status = 422


class ImageFetchError(BackendError, OSError):
    """A task image that could not be read (network error, HTTP error, missing file)."""

    status = 502


class LabelStudioError(BackendError, OSError):
    """Label Studio answered with an error or could not be reached."""

    status = 502


class LabelStudioUnavailableError(LabelStudioError):
    """Label Studio could not be reached, or answered 5xx: a transient fault worth retrying."""


class QueueDownError(BackendError):
    """The job queue (Redis) cannot be reached: ``/jobs`` answers 503."""

    status = 503


class JobNotFoundError(BackendError):
    """No job with that id (unknown, or expired after its TTL)."""

    status = 404


class UnknownVersionError(BackendError, LookupError):
    """``POST /versions/promote``: the project has no registered version of that name."""

    status = 404


class VersionUnusableError(BackendError):
    """``POST /versions/promote``: the version is registered but cannot serve (its checkpoint is gone)."""

    status = 409


class UsageError(Exception):
    """``cosod-backend``: bad input or an unreachable service: one line on stderr, exit code 2."""


# -- the job queue (backend.jobs) ----------------------------------------------------------------------


class JobQueueError(Exception):
    """Base class of the queue's own errors."""


class QueueUnavailableError(JobQueueError):
    """Redis cannot be reached (the message names the URL)."""


class JobCanceledError(JobQueueError):
    """Raised inside a running job by :func:`report_progress` after a cancel request."""


class JobTimeoutError(JobQueueError):
    """Raised inside an in-process job by :func:`report_progress` once it ran past its timeout."""


# -- job functions and workers (backend.jobs) ------------------------------------------------------------


class TransientJobError(RuntimeError):
    """Label Studio stayed unreachable through all attempts; the queue may run the job again."""


class PermanentJobError(RuntimeError):
    """A fault that another attempt cannot fix; the message says what to change."""


class GPUClaimError(RuntimeError):
    """No GPU could be chosen; the message says why and what to change."""


# -- corrections (issue 13) ----------------------------------------------------------------------------


class CorrectionRefusedError(BadRequestError):
    """A webhook's correction this backend will not store, though the event is well formed: a brush region
    over the pixel limit, an RLE whose header disagrees with its region, regions that disagree on the image
    size, a task of another project, more ids than one event may carry. The message names the rule and the
    limit; nothing was stored."""

    status = 422
