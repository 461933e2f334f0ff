"""Every exception of the backend. Those under :class:`BackendError` map to one HTTP status each; all carry
an actionable message."""

from __future__ import annotations


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
