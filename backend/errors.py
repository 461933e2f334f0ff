"""Exceptions of the Label Studio side: each maps to one HTTP status and carries an actionable message."""

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
