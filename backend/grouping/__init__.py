r"""Which tasks form a group, and which of them a prediction looks at.

Rules (``COSOD_GROUP_BY``, or ``group_by`` in the ML connection's extra params, per project):

- ``project``: every task of the project is one group.
- ``field:<name>``: tasks with the same value of ``task.data[<name>]`` form a group.
- ``filename:<regex>``: the group is the first capture group of ``<regex>`` searched in the image's file
  name (:func:`file_name`: the last path part of the task's image URL, percent-decoded, with Label Studio's
  upload prefix ``<8 hex>-`` stripped). ``filename:^(.+)_\d+\.\w+$`` groups ``cat_1.png`` and ``cat_2.jpg``
  as ``cat``.
- ``similar`` or ``similar:<threshold>``: groups formed from the images' own backbone features
  (:mod:`backend.grouping.similar`); the prediction layer assigns each task once and stores it, and a task's
  group is read from that assignment (``SIMILAR_KEY`` in its data, see :func:`tag_similar`).
- ``auto`` (default): ``field:group``.

With a field or file name rule, **tasks without a value** (field missing, null or empty; no regex match)
form one more group: all the project's tasks that lack it. When no task has one, that group is the whole
project, so ``auto`` on a project without a ``group`` field behaves like ``project``. Under ``similar``, the
tasks not yet assigned form that group.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import regex

from ..settings import parse_group_by

log = logging.getLogger(__name__)

DEFAULT_FIELD = "group"
# the data key under which a task's ``similar`` group travels (never a Label Studio field: starts with NUL)
SIMILAR_KEY = "\x00cosod_similar"
# Label Studio's upload prefix: /data/upload/<project>/<8 hex>-<original name>
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(?=.)")
MAX_NAME_CHARS = 255  # a file name longer than this is cut before the regex sees it (ext4's own limit)
# One match of a filename: regex may take this long; past it the name counts as not matching (logged). The
# rule's regex comes from a project's extra params: a pattern such as ^(a|aa)+$ backtracks exponentially, and
# Python's re holds the interpreter lock while it matches, which would stop every thread of the process.
MATCH_TIMEOUT_S = 0.05


@dataclass(frozen=True)
class TaskRef:
    """A task as far as grouping cares: its id and its data dict."""

    id: int
    data: Mapping[str, Any]


@dataclass(frozen=True)
class GroupKey:
    """``rule`` is ``project``, ``field:<name>``, ``filename:<regex>`` or ``similar``; ``value`` is the
    group's value (field value, capture, similar group id), None for "without it"."""

    rule: str
    value: str | None

    def __str__(self) -> str:
        if self.rule == "project":
            return "project"
        return f"{self.rule}={self.value}" if self.value is not None else f"{self.rule} (tasks without it)"


def effective_rule(group_by: str) -> str:
    """The rule ``group_by`` names, normalised: ``auto`` becomes ``field:group``; ``similar:<t>`` becomes
    ``similar`` (the threshold only matters when tasks are assigned, see :func:`similar_threshold`)."""
    rule = parse_group_by(group_by)
    if rule == "auto":
        return f"field:{DEFAULT_FIELD}"
    return "similar" if rule.startswith("similar") else rule


def similar_threshold(group_by: str) -> float | None:
    """The threshold of a ``similar:<t>`` rule; None for plain ``similar`` (the setting's) or another rule."""
    rule = parse_group_by(group_by)
    return float(rule.split(":", 1)[1]) if rule.startswith("similar:") else None


def file_name(ref: Any) -> str | None:
    """The file name of an image reference: the last part of its path (``?d=`` of Label Studio's local-files
    URLs), percent-decoded, without Label Studio's upload prefix ``<8 hex>-``. None when there is none."""
    if not isinstance(ref, str) or not ref.strip():
        return None
    parts = urlsplit(ref.strip())
    path = parts.path
    local = parse_qs(parts.query).get("d")
    if local:
        path = local[0]
    name = posixpath.basename(unquote(path).replace("\\", "/"))
    name = _UPLOAD_PREFIX.sub("", name, count=1)
    return name[:MAX_NAME_CHARS] or None


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern)


def _capture(pattern: str, name: str) -> str | None:
    """The first capture group of ``pattern`` searched in ``name``; None when it does not match, or when the
    search takes more than :data:`MATCH_TIMEOUT_S` (the ``regex`` package stops it; ``re`` cannot)."""
    try:
        match = _compiled(pattern).search(name, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        log.warning(
            "group_by filename:%s gave up on %r after %.2f s: no group", pattern, name, MATCH_TIMEOUT_S
        )
        return None
    return match.group(1) if match else None


def group_key(data: Mapping[str, Any], group_by: str, image_key: str = "image") -> GroupKey:
    """The group a task with this ``data`` belongs to (``image_key``: the data key of its image, which the
    ``filename:`` rule reads)."""
    rule = effective_rule(group_by)
    if rule == "project":
        return GroupKey("project", None)
    if not isinstance(data, Mapping):
        return GroupKey(rule, None)
    if rule == "similar":
        value = data.get(SIMILAR_KEY)
    elif rule.startswith("filename:"):
        name = file_name(data.get(image_key))
        value = _capture(rule[len("filename:") :], name) if name else None
    else:
        value = data.get(rule[len("field:") :])
    if value is None or (isinstance(value, str) and not value.strip()):
        return GroupKey(rule, None)
    return GroupKey(rule, str(value))


def tag_similar(tasks: Iterable[TaskRef], assigned: Mapping[int, str]) -> list[TaskRef]:
    """``tasks`` with their ``similar`` group (``assigned``: task id -> group id) in their data."""
    out = []
    for t in tasks:
        data = {k: v for k, v in t.data.items() if k != SIMILAR_KEY}
        if t.id in assigned:
            data[SIMILAR_KEY] = assigned[t.id]
        out.append(TaskRef(t.id, data))
    return out


def groups_of(
    tasks: Iterable[TaskRef], group_by: str, image_key: str = "image"
) -> dict[GroupKey, list[TaskRef]]:
    """Every group of ``tasks``: key -> its tasks sorted by id, each id once (the first occurrence wins).
    Each task's key is computed once (:func:`members` would compute them once per group)."""
    seen: dict[int, TaskRef] = {}
    for t in tasks:
        seen.setdefault(t.id, t)
    out: dict[GroupKey, list[TaskRef]] = {}
    for i in sorted(seen):
        out.setdefault(group_key(seen[i].data, group_by, image_key), []).append(seen[i])
    return out


def members(tasks: Iterable[TaskRef], key: GroupKey, image_key: str = "image") -> list[TaskRef]:
    """The tasks of ``key``'s group, sorted by id, each id once (the first occurrence wins)."""
    seen: dict[int, TaskRef] = {}
    for t in tasks:
        if t.id not in seen and group_key(t.data, key.rule, image_key) == key:
            seen[t.id] = t
    return [seen[i] for i in sorted(seen)]


def choose_subset(member_ids: Sequence[int], wanted: Iterable[int], *, k: int, limit: int) -> list[int]:
    """The ids a prediction computes on: the whole group when it has at most ``limit`` members, else the
    ``wanted`` ids plus ``k`` references spread evenly over the id-sorted group (deterministic)."""
    ids = sorted(set(member_ids))
    if len(ids) <= limit:
        return ids
    want = [i for i in dict.fromkeys(wanted) if i in set(ids)]
    step = len(ids) / k
    refs = [ids[int(j * step)] for j in range(k)]
    return sorted(set(want) | set(refs))


def group_digest(key: GroupKey, tasks: Sequence[TaskRef], image_key: str) -> str:
    """Identity of a group's content: its rule and value, and each member's id and image reference."""
    h = hashlib.sha256(f"{key.rule}\x00{key.value}".encode("utf-8", "surrogatepass"))
    for t in sorted(tasks, key=lambda t: t.id):
        h.update(f"\x00{t.id}\x00{t.data.get(image_key)}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]
