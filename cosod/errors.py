"""Exceptions raised by the cosod library. Each one carries a message a user can act on."""

from __future__ import annotations


class CoSODError(Exception):
    """Base class of every error this library raises on purpose."""


class UnknownBackboneError(CoSODError, KeyError):
    """A backbone name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown backbone"


class WeightsMissingError(CoSODError, FileNotFoundError):
    """A backbone's weights file is not where it is expected, and no fetch was asked for."""

    def __init__(self, name: str, path: str, hub_id: str | None):
        self.name = name
        self.path = path
        self.hub_id = hub_id
        how = (
            f"run `cosod weights fetch {name}` on a machine with internet access (timm hub id {hub_id})"
            if hub_id
            else "this backbone has no hub id; provide the file yourself"
        )
        super().__init__(f"weights for backbone {name!r} not found: expected the file {path}; {how}")

    def __str__(self) -> str:
        return str(self.args[0])


class WeightsInvalidError(CoSODError, ValueError):
    """A weights file exists but does not fit the backbone (wrong keys, shapes or hash)."""


class WeightsChecksumError(WeightsInvalidError):
    """A weights file (or a download) whose content sha256 is not the one its backbone spec pins."""

    def __init__(self, path: str, actual: str, expected: str, fix: str):
        self.path = path
        self.actual = actual
        self.expected = expected
        super().__init__(f"weights file {path} has sha256 {actual}, expected {expected}; {fix}")


class CheckpointError(CoSODError, ValueError):
    """A stage-1 or UMS checkpoint that cannot be read or does not fit the model."""


class ImageReadError(CoSODError, ValueError):
    """An image that cannot be decoded, or is larger than the configured limits."""


class DatasetError(CoSODError, FileNotFoundError):
    """A dataset folder that is missing or does not follow the CoSOD layout."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "dataset error"


class UnknownMethodError(CoSODError, ValueError):
    """A model name (``PipelineConfig.model``, ``--model``) that is not in :data:`cosod.methods.METHODS`."""


class UsageError(Exception):
    """``cosod``: a problem the user must fix; printed as one line, exit code 2."""


class CRFWorkerError(RuntimeError):
    """A dense-CRF worker process died while it held part of a group (:mod:`cosod.densecrf`)."""


class CRFFailed(Exception):
    """pydensecrf raised in a CRF worker process (the message names the original exception)."""
