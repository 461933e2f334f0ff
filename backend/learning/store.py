"""SQLite state in ``MODEL_DIR/cosod.sqlite3``: corrected masks, per-project counters and model versions.

Safe for several processes (gunicorn workers, RQ workers): WAL journal, a busy timeout, ``BEGIN IMMEDIATE``
for every write, and ``synchronous=FULL`` so that a correction is on disk before :meth:`Store.put_correction`
returns (it survives a SIGKILL or a power cut right after). Each call opens its own short-lived connection,
so a :class:`Store` can be shared between threads and survives a fork.

Corrections are keyed by (project, annotation id). A write with the same content is a no-op (re-delivered
webhooks change nothing); an event older than the stored one (``ls_updated``, Label Studio's
``updated_at``) is ignored. Every real change bumps the project's ``change_seq``; a fine-tune records the
sequence it trained on (``trained_seq``), and the difference is the number of pending changes.

**Tombstones.** Label Studio may deliver an annotation's CREATED/UPDATED after its DELETED (webhooks are
sent from a queue), and a late event must not bring a deleted correction back. So removing a *stored*
correction leaves a tombstone (project, annotation id, task id, ``cutoff``), and a later write of that
annotation is dropped (``"deleted_before"``) only when it is for the same task and its ``updated_at`` is
not after ``cutoff`` (or unknown): it describes the annotation as it was before the deletion. ``cutoff`` is
the time the deletion was received, or the removed row's ``updated_at`` if later (clocks may drift); for a
cancelled annotation, the cancellation's own ``updated_at``. A write that passes removes the tombstone. The
rule is sound only for annotations this store held, so:

- a deletion of an annotation never stored (an unknown id, or a forged list of ids) leaves nothing behind and
  never blocks a later creation of that id;
- a genuine later write of the same id (un-cancelling a skipped annotation; a new Label Studio database
  that numbers annotations from 1 again, same MODEL_DIR) carries a later ``updated_at`` and is stored;
- not covered: an annotation whose CREATED arrives only after its DELETED was never stored when the
  deletion came, so its late CREATED is stored (delete it again in Label Studio to remove it);
- tombstones written before this rule (no task id) block nothing.
One webhook event is one write transaction, whatever the number of ids it carries
(:meth:`Store.delete_corrections`).

**Reading.** :meth:`Store.load_corrections` checks each row before decoding its PNG (size within the pixel
limit, PNG header agreeing with the row) and returns the rows it could not use with the reason, so one bad
row (e.g. a 16384x16384 mask stored before the webhook checked sizes) is skipped and reported, never sinks
every later fine-tune.

The ``versions`` and ``active`` tables belong to :mod:`backend.learning.versions`; they live here so one file
and one transaction cover a registration, a promotion and the counter reset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cosod.imageio import DEFAULT_MAX_PIXELS

from .rows import Correction, SkippedCorrection, ls_time, mask_to_png, png_to_mask

log = logging.getLogger(__name__)

DB_NAME = "cosod.sqlite3"
BUSY_TIMEOUT_S = 30.0
MAX_ID = (1 << 63) - 1  # SQLite's INTEGER

SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    project INTEGER NOT NULL,
    annotation_id INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    group_key TEXT NOT NULL,
    image_url TEXT NOT NULL,
    image_hash TEXT,
    mask_png BLOB,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    empty INTEGER NOT NULL,
    digest TEXT NOT NULL,
    ls_updated TEXT NOT NULL DEFAULT '',
    updated REAL NOT NULL,
    PRIMARY KEY (project, annotation_id)
);
CREATE INDEX IF NOT EXISTS corrections_task ON corrections (project, task_id);
CREATE TABLE IF NOT EXISTS tombstones (
    project INTEGER NOT NULL,
    annotation_id INTEGER NOT NULL,
    deleted REAL NOT NULL,
    task_id INTEGER,
    cutoff REAL,
    PRIMARY KEY (project, annotation_id)
);
CREATE TABLE IF NOT EXISTS project_state (
    project INTEGER PRIMARY KEY,
    change_seq INTEGER NOT NULL DEFAULT 0,
    trained_seq INTEGER NOT NULL DEFAULT 0,
    train_requested INTEGER NOT NULL DEFAULT 0,
    last_finetune REAL
);
CREATE TABLE IF NOT EXISTS versions (
    project INTEGER NOT NULL,
    version TEXT NOT NULL,
    model TEXT NOT NULL,
    parent TEXT,
    path TEXT,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (project, version)
);
CREATE TABLE IF NOT EXISTS active (
    project INTEGER PRIMARY KEY,
    version TEXT NOT NULL,
    changed REAL NOT NULL
);
"""


# columns added since the first schema: (table, column, type); added to an existing file when missing
_ADDED_COLUMNS = (("tombstones", "task_id", "INTEGER"), ("tombstones", "cutoff", "REAL"))


def _check_id(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"{name} must lie in 0..2**63-1 (an SQLite INTEGER), got {value}")
    return value


class Store:
    """The backend's SQLite database. ``root`` is MODEL_DIR (created if missing)."""

    def __init__(self, root: str | os.PathLike[str], *, busy_timeout: float = BUSY_TIMEOUT_S):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self.busy_timeout = busy_timeout
        deadline = time.monotonic() + busy_timeout  # processes opening a new MODEL_DIR together race for
        while True:  # the switch to WAL, which answers "database is locked" at once instead of waiting
            try:
                return self._create()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _create(self) -> None:
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
            for table, column, kind in _ADDED_COLUMNS:
                have = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    try:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError:  # another process added it meanwhile
                        pass

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode (transactions are explicit, see :meth:`write`)."""
        con = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            yield con
        finally:
            con.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``), committed on success, rolled back on any error."""
        with self.connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- corrections ----------------------------------------------------------------------------------
    @staticmethod
    def _bump(con: sqlite3.Connection, project: int, n: int = 1) -> None:
        con.execute("INSERT OR IGNORE INTO project_state (project) VALUES (?)", (project,))
        con.execute("UPDATE project_state SET change_seq = change_seq + ? WHERE project = ?", (n, project))

    def put_correction(
        self,
        *,
        project: int,
        annotation_id: int,
        task_id: int,
        group_key: str,
        image_url: str,
        mask: np.ndarray | None,
        ls_updated: str = "",
    ) -> str:
        """Insert or replace the correction of an annotation; committed before returning.

        ``mask``: bool HxW at the original image size, or None for an empty correction of unknown size.
        Returns ``"inserted"``, ``"updated"``, ``"unchanged"`` (same content, e.g. a re-delivered event),
        ``"stale"`` (``ls_updated`` older than the stored one) or ``"deleted_before"`` (a tombstone of the
        same task whose cutoff is not before ``ls_updated``, see the module doc). Ids must lie in
        0..2**63-1 (TypeError / ValueError otherwise).
        """
        for name, value in (("project", project), ("annotation_id", annotation_id), ("task_id", task_id)):
            _check_id(name, value)
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim != 2 or mask.dtype != bool or mask.size == 0:
                raise ValueError(f"mask must be a non-empty bool HxW array, got {mask.dtype} {mask.shape}")
            png: bytes | None = mask_to_png(mask)
            height, width = mask.shape
            empty = not bool(mask.any())
        else:
            png, height, width, empty = None, 0, 0, True
        h = hashlib.sha256(
            f"{task_id}\x00{group_key}\x00{image_url}\x00{width}x{height}\x00".encode(
                "utf-8", "surrogatepass"
            )
        )
        h.update(png or b"")
        digest = h.hexdigest()
        event_time = ls_time(ls_updated)
        with self.write() as con:
            tomb = con.execute(
                "SELECT task_id, cutoff FROM tombstones WHERE project = ? AND annotation_id = ?",
                (project, annotation_id),
            ).fetchone()
            if tomb is not None and tomb[0] == task_id:
                cutoff = tomb[1] if tomb[1] is not None else float("inf")
                if event_time is None or event_time <= cutoff:
                    return "deleted_before"
            if tomb is not None:  # a write after the deletion: the annotation lives again
                con.execute(
                    "DELETE FROM tombstones WHERE project = ? AND annotation_id = ?", (project, annotation_id)
                )
            row = con.execute(
                "SELECT digest, ls_updated, image_hash, image_url FROM corrections "
                "WHERE project = ? AND annotation_id = ?",
                (project, annotation_id),
            ).fetchone()
            if row is not None and row[0] == digest:
                return "unchanged"
            if row is not None and ls_updated and row[1] and ls_updated < row[1]:
                return "stale"
            known_hash = row[2] if row is not None and row[3] == image_url else None
            con.execute(
                "INSERT OR REPLACE INTO corrections (project, annotation_id, task_id, group_key, image_url, "
                "image_hash, mask_png, width, height, empty, digest, ls_updated, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    project,
                    annotation_id,
                    task_id,
                    group_key,
                    image_url,
                    known_hash,
                    png,
                    width,
                    height,
                    int(empty),
                    digest,
                    ls_updated or "",
                    time.time(),
                ),
            )
            self._bump(con, project)
        return "inserted" if row is None else "updated"

    def delete_correction(self, project: int, annotation_id: int, *, cutoff: float | None = None) -> bool:
        """Remove one annotation's correction (see :meth:`delete_corrections`); True when one was removed."""
        return self.delete_corrections(project, [annotation_id], cutoff=cutoff) > 0

    def delete_corrections(
        self, project: int, annotation_ids: Iterable[int], *, cutoff: float | None = None
    ) -> int:
        """Remove the corrections of these annotations in one transaction; returns how many were stored.

        Each removed correction leaves a tombstone whose cutoff is ``cutoff`` (default: now) or the removed
        row's ``updated_at`` if later; ids with no stored correction leave nothing (module doc). The work is
        a few set-wise statements over a temporary table of the ids, so 10,000 ids cost one fsync.
        """
        _check_id("project", project)
        ids = sorted({_check_id("annotation_id", a) for a in annotation_ids})
        if not ids:
            return 0
        now = time.time()
        base = now if cutoff is None else cutoff
        with self.write() as con:
            con.execute("CREATE TEMP TABLE IF NOT EXISTS deleting (id INTEGER PRIMARY KEY)")
            con.execute("DELETE FROM temp.deleting")
            con.executemany("INSERT INTO temp.deleting (id) VALUES (?)", ((a,) for a in ids))
            rows = con.execute(
                "SELECT annotation_id, task_id, ls_updated FROM corrections "
                "WHERE project = ? AND annotation_id IN (SELECT id FROM temp.deleting)",
                (project,),
            ).fetchall()
            if rows:
                con.executemany(
                    "INSERT OR REPLACE INTO tombstones (project, annotation_id, deleted, task_id, cutoff) "
                    "VALUES (?, ?, ?, ?, ?)",
                    ((project, a, now, t, max(base, ls_time(u) or base)) for a, t, u in rows),
                )
                con.execute(
                    "DELETE FROM corrections "
                    "WHERE project = ? AND annotation_id IN (SELECT id FROM temp.deleting)",
                    (project,),
                )
                self._bump(con, project, len(rows))
            con.execute("DELETE FROM temp.deleting")
        return len(rows)

    def set_image_hash(self, project: int, annotation_id: int, image_hash: str) -> None:
        """Fill in the content hash once the fine-tune job has read the image (not a content change)."""
        with self.write() as con:
            con.execute(
                "UPDATE corrections SET image_hash = ? WHERE project = ? AND annotation_id = ?",
                (image_hash, project, annotation_id),
            )

    def corrections(self, project: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Correction]:
        """The project's usable corrections, one per task (the most recently updated annotation wins), by
        task id; rows that cannot be used are skipped and logged (:meth:`load_corrections` reports them)."""
        return self.load_corrections(project, max_pixels=max_pixels)[0]

    def load_corrections(
        self, project: int, *, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[list[Correction], list[SkippedCorrection]]:
        """``(corrections, skipped)``: the project's corrections, one per task (the most recently updated
        usable annotation wins), by task id; and the rows that could not be used, each with its reason.

        A row is checked before its mask is decoded: ``width * height`` at most ``max_pixels``
        (``COSOD_MAX_IMAGE_PIXELS``), a PNG whose header agrees with the row's size. Only one row's mask
        is decoded at a time, and a bad one never raises.
        """
        with self.connect() as con:
            rows = con.execute(
                "SELECT project, annotation_id, task_id, group_key, image_url, image_hash, width, height, "
                "empty, updated, mask_png FROM corrections WHERE project = ? "
                "ORDER BY task_id, updated, annotation_id",
                (project,),
            ).fetchall()
        latest: dict[int, Correction] = {}
        skipped: list[SkippedCorrection] = []
        for r in rows:
            width, height, png = int(r[6]), int(r[7]), r[10]
            try:
                if width < 0 or height < 0:
                    raise ValueError(f"the stored mask's size {width}x{height} is negative")
                if width * height > max_pixels:
                    raise ValueError(
                        f"the stored mask is {width}x{height}, over the limit of {max_pixels} pixels"
                    )
                mask = None if png is None else png_to_mask(png, max_pixels=max_pixels, size=(width, height))
            except ValueError as exc:
                skip = SkippedCorrection(int(r[0]), int(r[1]), int(r[2]), str(exc))
                log.warning(
                    "project %s annotation %s (task %s): correction skipped: %s",
                    skip.project,
                    skip.annotation_id,
                    skip.task_id,
                    skip.reason,
                )
                skipped.append(skip)
                continue
            latest[r[2]] = Correction(
                r[0], r[1], r[2], r[3], r[4], r[5], mask, width, height, bool(r[8]), r[9]
            )
        return [latest[t] for t in sorted(latest)], skipped

    def knows_project(self, project: int) -> bool:
        """Whether this file holds any state of the project (corrections, counters, versions)."""
        with self.connect() as con:
            row = con.execute(
                "SELECT EXISTS (SELECT 1 FROM project_state WHERE project = ?) "
                "OR EXISTS (SELECT 1 FROM versions WHERE project = ?) "
                "OR EXISTS (SELECT 1 FROM corrections WHERE project = ?)",
                (project, project, project),
            ).fetchone()
        return bool(row[0])

    def count_corrections(self, project: int) -> int:
        with self.connect() as con:
            return int(
                con.execute("SELECT COUNT(*) FROM corrections WHERE project = ?", (project,)).fetchone()[0]
            )

    # -- counters -------------------------------------------------------------------------------------
    def change_seq(self, project: int) -> int:
        with self.connect() as con:
            row = con.execute("SELECT change_seq FROM project_state WHERE project = ?", (project,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, project: int) -> int:
        """Changes (inserts, updates, deletes) since the last finished fine-tune."""
        with self.connect() as con:
            row = con.execute(
                "SELECT change_seq - trained_seq FROM project_state WHERE project = ?", (project,)
            ).fetchone()
        return int(row[0]) if row else 0

    def request_training(self, project: int) -> None:
        with self.write() as con:
            con.execute("INSERT OR IGNORE INTO project_state (project) VALUES (?)", (project,))
            con.execute("UPDATE project_state SET train_requested = 1 WHERE project = ?", (project,))

    def training_requested(self, project: int) -> bool:
        with self.connect() as con:
            row = con.execute(
                "SELECT train_requested FROM project_state WHERE project = ?", (project,)
            ).fetchone()
        return bool(row and row[0])

    @staticmethod
    def mark_trained(con: sqlite3.Connection, project: int, seq: int) -> None:
        """Inside a :meth:`write` transaction: the changes up to ``seq`` are trained on; clear the request."""
        con.execute("INSERT OR IGNORE INTO project_state (project) VALUES (?)", (project,))
        con.execute(
            "UPDATE project_state SET trained_seq = MAX(trained_seq, ?), train_requested = 0, "
            "last_finetune = ? WHERE project = ?",
            (seq, time.time(), project),
        )

    def projects(self) -> list[int]:
        with self.connect() as con:
            rows = con.execute(
                "SELECT project FROM project_state UNION SELECT project FROM versions ORDER BY 1"
            ).fetchall()
        return [int(r[0]) for r in rows]
