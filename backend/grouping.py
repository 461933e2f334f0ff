"""Which tasks form a group, and which of them a prediction looks at.

Rules (``COSOD_GROUP_BY``, or ``group_by`` in the ML connection's extra params, per project):

- ``project``: every task of the project is one group.
- ``field:<name>``: tasks with the same value of ``task.data[<name>]`` form a group.
- ``auto`` (default): ``field:group``.

With a field rule, **tasks without the field** (missing, null or empty string) form one more group: all the
project's tasks that lack it. When no task has the field, that group is the whole project, so ``auto`` on a
project without a ``group`` field behaves like ``project``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .settings import parse_group_by

DEFAULT_FIELD = "group"


@dataclass(frozen=True)
class TaskRef:
    """A task as far as grouping cares: its id and its data dict."""

    id: int
    data: Mapping[str, Any]


@dataclass(frozen=True)
class GroupKey:
    """``rule`` is ``project`` or ``field:<name>``; ``value`` is the field value, None for "without it"."""

    rule: str
    value: str | None

    def __str__(self) -> str:
        if self.rule == "project":
            return "project"
        return f"{self.rule}={self.value}" if self.value is not None else f"{self.rule} (tasks without it)"


def effective_rule(group_by: str) -> str:
    rule = parse_group_by(group_by)
    return f"field:{DEFAULT_FIELD}" if rule == "auto" else rule


def group_key(data: Mapping[str, Any], group_by: str) -> GroupKey:
    """The group a task with this ``data`` belongs to."""
    rule = effective_rule(group_by)
    if rule == "project":
        return GroupKey("project", None)
    value = data.get(rule[len("field:") :]) if isinstance(data, Mapping) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return GroupKey(rule, None)
    return GroupKey(rule, str(value))


def members(tasks: Iterable[TaskRef], key: GroupKey) -> list[TaskRef]:
    """The tasks of ``key``'s group, sorted by id, each id once (the first occurrence wins)."""
    seen: dict[int, TaskRef] = {}
    for t in tasks:
        if t.id not in seen and group_key(t.data, key.rule) == key:
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
