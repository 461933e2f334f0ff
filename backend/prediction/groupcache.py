"""Group results, cached: (model version, group content digest) -> {task id: :class:`Outcome`}.

The digest covers the group's rule, value and its members' image references (:func:`backend.grouping.
group_digest`), so a group whose tasks change gets a new entry; a new model version does too. One per
process, LRU over groups, bounded twice: at most ``COSOD_GROUP_CACHE_SIZE`` groups and at most
:data:`MAX_CACHE_BYTES` of masks (stored bit-packed, 1 bit per pixel), so a request with thousands of tasks
cannot pin their masks in memory. Fetch failures are never cached (the next request tries again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

MAX_CACHE_BYTES = 256 * 1024 * 1024  # packed masks: about 2,000 masks of 1 Mpx


@dataclass(frozen=True)
class Outcome:
    """A task's result within a group: a mask and score, or the reason there is none."""

    mask: np.ndarray | None = None
    score: float = 0.0
    error: str | None = None
    kind: str | None = None  # "image_unreadable" | "image_refused" | "image_fetch" | "not_computed"
    absent: bool = False  # judged without the group's object (absence decision on; the mask is empty)


@dataclass(frozen=True)
class _Packed:
    bits: np.ndarray | None
    shape: tuple[int, ...]
    score: float
    error: str | None
    kind: str | None
    absent: bool = False

    @classmethod
    def of(cls, out: Outcome) -> _Packed:
        if out.mask is None:
            return cls(None, (), out.score, out.error, out.kind, out.absent)
        mask = np.asarray(out.mask, dtype=bool)
        return cls(np.packbits(mask, axis=None), mask.shape, out.score, out.error, out.kind, out.absent)

    def outcome(self) -> Outcome:
        mask = None
        if self.bits is not None:
            n = int(np.prod(self.shape))
            mask = np.unpackbits(self.bits, count=n).astype(bool).reshape(self.shape)
        return Outcome(mask=mask, score=self.score, error=self.error, kind=self.kind, absent=self.absent)

    @property
    def nbytes(self) -> int:
        return 64 + (self.bits.nbytes if self.bits is not None else 0) + len(self.error or "")


class GroupCache:
    """LRU of group results: (model version, group digest) -> {task id: Outcome}, bounded in groups and in
    bytes (the least recently used groups go first; a group larger than the byte bound is not kept)."""

    def __init__(self, size: int, max_bytes: int = MAX_CACHE_BYTES):
        self.size = size
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, str], dict[int, _Packed]] = OrderedDict()
        self._bytes: dict[tuple[str, str], int] = {}

    def get(self, key: tuple[str, str], ids: Iterable[int]) -> dict[int, Outcome]:
        """The cached outcomes of ``ids`` in the group ``key`` (those not cached are left out)."""
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                return {}
            self._data.move_to_end(key)
            found = {i: entry[i] for i in ids if i in entry}
        return {i: p.outcome() for i, p in found.items()}

    def put(self, key: tuple[str, str], outcomes: Mapping[int, Outcome]) -> None:
        packed = {i: _Packed.of(o) for i, o in outcomes.items()}
        with self._lock:
            merged = {**self._data.get(key, {}), **packed}
            self._data[key] = merged
            self._bytes[key] = sum(p.nbytes for p in merged.values())
            self._data.move_to_end(key)
            while self._data and (len(self._data) > self.size or self.nbytes > self.max_bytes):
                old, _ = self._data.popitem(last=False)
                self._bytes.pop(old, None)

    @property
    def nbytes(self) -> int:
        """The bytes the cached masks take (approximately: packed bits plus a small overhead each)."""
        return sum(self._bytes.values())

    def __len__(self) -> int:
        return len(self._data)
