"""Task images read ahead of use, so that Label Studio I/O overlaps the pipeline instead of adding to it.

A prelabel job starts reading the images it needs next while the pipeline computes the current chunk: those
of its own next chunk, or, on its last chunk, those of the group job queued next (which this worker most
likely runs next). :class:`ImagesAhead` keeps the bytes by project and image reference (bytes read for one
project's request are never handed to another's); the Label Studio client's ``read_image`` takes them from
there (once each) before it would download them. Everything here is an
optimisation: an image that was not read ahead, or whose read failed, is read as usual when it is needed,
with the usual checks and errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import brief, quote

log = logging.getLogger(__name__)

AHEAD_THREADS = 4  # concurrent downloads of one read-ahead


Key = tuple[int | None, str]  # (project id, image reference)


class ImagesAhead:
    """Image bytes by project id and reference, each taken at most once, dropped after ``ttl`` seconds, at
    most ``max_bytes`` in all (the oldest go first). ``project_id`` None is a scope of its own."""

    def __init__(self, max_bytes: int = 256 << 20, ttl: float = 600.0):
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._lock = threading.Lock()
        self._items: OrderedDict[Key, tuple[float, bytes]] = OrderedDict()
        self._size = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _drop_old(self, now: float) -> None:
        while self._items:
            ref, (t, data) = next(iter(self._items.items()))
            if now - t <= self.ttl and self._size <= self.max_bytes:
                return
            del self._items[ref]
            self._size -= len(data)

    def put(self, ref: str, data: bytes, project_id: int | None = None) -> None:
        if len(data) > self.max_bytes:
            return
        key = (project_id, ref)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old[1])
            self._items[key] = (time.monotonic(), data)
            self._size += len(data)
            self._drop_old(time.monotonic())

    def take(self, ref: str, project_id: int | None = None) -> bytes | None:
        with self._lock:
            self._drop_old(time.monotonic())
            item = self._items.pop((project_id, ref), None)
            if item is None:
                self.misses += 1
                return None
            self._size -= len(item[1])
            self.hits += 1
            return item[1]

    def holds(self, ref: str, project_id: int | None = None) -> bool:
        with self._lock:
            return (project_id, ref) in self._items

    def fill(
        self,
        refs: Iterable[tuple[str, int | None]],
        read: Callable[[str, int | None], bytes],
        project_id: int | None = None,
    ) -> int:
        """Read each ``(reference, task id)`` not held yet with ``read`` (in this thread and up to
        :data:`AHEAD_THREADS` helpers) and keep it for ``project_id``; ``read`` must read for that project
        (``LabelStudioClient.read_ahead`` pairs them). A failed read is left for the real one. Returns how
        many were read."""
        todo = [
            (r, tid) for r, tid in dict.fromkeys(refs) if isinstance(r, str) and not self.holds(r, project_id)
        ]

        def one(item: tuple[str, int | None]) -> bool:
            ref, tid = item
            try:
                self.put(ref, read(ref, tid), project_id)
                return True
            except Exception as exc:  # the real read reports it
                log.debug("reading ahead %s (task %s) failed: %s", quote(ref), tid, brief(str(exc)))
                return False

        if not todo:
            return 0
        with ThreadPoolExecutor(max_workers=min(AHEAD_THREADS, len(todo))) as pool:
            return sum(pool.map(one, todo))
