"""Group results, cached: (model version, group content digest) -> {task id: :class:`Outcome`}.

The digest covers the group's rule, value and its members' image references (:func:`backend.grouping.
group_digest`), so a group whose tasks change gets a new entry; a new model version does too. One per
process, LRU, ``COSOD_GROUP_CACHE_SIZE`` groups. Fetch failures are never cached (the next request tries
again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Outcome:
    """A task's result within a group: a mask and score, or the reason there is none."""

    mask: np.ndarray | None = None
    score: float = 0.0
    error: str | None = None
    kind: str | None = None  # "image_unreadable" | "image_refused" | "image_fetch"


class GroupCache:
    """LRU of group results: (model version, group digest) -> {task id: Outcome}."""

    def __init__(self, size: int):
        self.size = size
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, str], dict[int, Outcome]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> dict[int, Outcome]:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return dict(self._data[key])
            return {}

    def put(self, key: tuple[str, str], outcomes: Mapping[int, Outcome]) -> None:
        with self._lock:
            merged = {**self._data.get(key, {}), **outcomes}
            self._data[key] = merged
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
