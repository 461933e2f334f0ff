"""What Label Studio sends us, named once: the webhook events we act on, and ids.

Webhook events (Label Studio 1.23, ``../shared/docs/label_studio_protocol.md``):

- :data:`ANNOTATION_EVENTS` carry an annotation whose brush mask is a correction to store;
- :data:`DELETE_EVENTS` remove one correction, or several (``ANNOTATIONS_DELETED``, the bulk delete of the
  Data Manager, carries a list of ids);
- :data:`TRAIN_EVENT` asks for a fine-tune now;
- :data:`LEARNING_EVENTS` is all of these: the webhook answers ``"ok"`` to them and ``"ignored"`` to others;
- events in :func:`changes_membership` (``TASKS_*``, ``PROJECT_UPDATED``) may change a project's groups, so
  its cached task list is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..errors import BadRequestError, quote

MAX_ID_DIGITS = 18  # an id in a string: at most this many ASCII digits (fits a 64-bit integer)
MAX_ID = (1 << 63) - 1  # SQLite's INTEGER (and Label Studio's bigint) holds no more
# '<id>' or '<id>.<unix seconds>' (Label Studio's int(created_at.timestamp()): 9 to 11 digits), ASCII only
_ID_TEXT = re.compile(rf"([0-9]{{1,{MAX_ID_DIGITS}}})(?:\.[0-9]{{9,11}})?")

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
DELETE_EVENTS = ("ANNOTATION_DELETED", "ANNOTATIONS_DELETED")
TRAIN_EVENT = "START_TRAINING"
LEARNING_EVENTS = (*ANNOTATION_EVENTS, *DELETE_EVENTS, TRAIN_EVENT)
# Every action Label Studio 1.23 sends (webhooks/models.py WebhookAction, plus the training button's); the
# metrics count others as "other", so a client cannot grow the label set.
KNOWN_EVENTS = frozenset(
    {
        *LEARNING_EVENTS,
        "ANNOTATIONS_CREATED",
        "PROJECT_CREATED",
        "PROJECT_UPDATED",
        "PROJECT_DELETED",
        "TASKS_CREATED",
        "TASKS_DELETED",
        "LABEL_LINK_CREATED",
        "LABEL_LINK_UPDATED",
        "LABEL_LINK_DELETED",
    }
)


def changes_membership(event: str) -> bool:
    """Whether ``event`` may add, remove or regroup a project's tasks."""
    return event.startswith("TASKS_") or event == "PROJECT_UPDATED"


def parse_id(value: Any, what: str) -> int:
    """A Label Studio id as an int in 1..2**63-1, from what Label Studio and users send: ``12``, ``"12"``,
    ``"12.1795340308"`` (``<id>.<created timestamp>``, how ``/setup`` and ``/predict`` name a project: the
    suffix is Label Studio's ``int(created_at.timestamp())``, 9 to 11 ASCII digits), or an object with an
    ``"id"``. In a string, only 1 to :data:`MAX_ID_DIGITS` ASCII digits count (a fullwidth "３" is no id),
    and ``"3.9"`` is not project 3. Anything else (a bool, a float, 0, 2**63, a name) raises
    :class:`BadRequestError` naming ``what`` and quoting the value (cut, see :func:`backend.errors.quote`)."""
    raw = value
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, str):
        match = _ID_TEXT.fullmatch(value.strip(" \t\r\n"))
        value = int(match.group(1)) if match else None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise BadRequestError(
            f"{what} must be a positive integer id below 2**63 (or '<id>.<timestamp>'), got {quote(raw)}"
        )
    return value
