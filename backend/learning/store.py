"""SQLite state in ``MODEL_DIR/cosod.sqlite3``: corrected masks, per-project counters and model versions.

Safe for several processes (gunicorn workers, RQ workers): WAL journal, a busy timeout, ``BEGIN IMMEDIATE``
for every write, and ``synchronous=FULL`` so that a correction is on disk before :meth:`Store.put_correction`
returns (it survives a SIGKILL or a power cut right after). Each call opens its own short-lived connection,
so a :class:`Store` can be shared between threads and survives a fork.

Corrections are keyed by (project, annotation id). A write with the same content is a no-op (re-delivered
webhooks change nothing); an event older than the stored one (``ls_updated``, Label Studio's
``updated_at``) is ignored; a deleted annotation leaves a tombstone so a late re-delivery of its create
event cannot bring it back. Every real change bumps the project's ``change_seq``; a fine-tune records the
sequence it trained on (``trained_seq``), and the difference is the number of pending changes.

The ``versions`` and ``active`` tables belong to :mod:`backend.learning.versions`; they live here so one file
and one transaction cover a registration, a promotion and the counter reset.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DB_NAME = "cosod.sqlite3"
BUSY_TIMEOUT_S = 30.0

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


@dataclass(frozen=True)
class Correction:
    """A stored corrected mask. ``mask``: bool HxW at the image's original size, or None for an empty
    correction whose size is unknown (an annotation with no region: "no object in this image")."""

    project: int
    annotation_id: int
    task_id: int
    group_key: str
    image_url: str
    image_hash: str | None
    mask: np.ndarray | None
    width: int
    height: int
    empty: bool
    updated: float


def mask_to_png(mask: np.ndarray) -> bytes:
    """bool HxW -> 1-bit PNG bytes (lossless, small)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    """PNG bytes -> bool HxW."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L")) > 0


class Store:
    """The backend's SQLite database. ``root`` is MODEL_DIR (created if missing)."""

    def __init__(self, root: str | os.PathLike[str], *, busy_timeout: float = BUSY_TIMEOUT_S):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / DB_NAME
        self.busy_timeout = busy_timeout
        with self.connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

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
    def _bump(con: sqlite3.Connection, project: int) -> None:
        con.execute("INSERT OR IGNORE INTO project_state (project) VALUES (?)", (project,))
        con.execute("UPDATE project_state SET change_seq = change_seq + 1 WHERE project = ?", (project,))

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
        ``"stale"`` (``ls_updated`` older than the stored one) or ``"deleted_before"`` (a tombstone exists).
        """
        for name, value in (("project", project), ("annotation_id", annotation_id), ("task_id", task_id)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if mask is not None:
            mask = np.asarray(mask)
            if mask.ndim != 2 or mask.dtype != bool or mask.size == 0:
                raise ValueError(f"mask must be a non-empty bool HxW array, got {mask.dtype} {mask.shape}")
            png: bytes | None = mask_to_png(mask)
            height, width = mask.shape
            empty = not bool(mask.any())
        else:
            png, height, width, empty = None, 0, 0, True
        h = hashlib.sha256(f"{task_id}\x00{group_key}\x00{image_url}\x00{width}x{height}\x00".encode())
        h.update(png or b"")
        digest = h.hexdigest()
        with self.write() as con:
            if con.execute(
                "SELECT 1 FROM tombstones WHERE project = ? AND annotation_id = ?", (project, annotation_id)
            ).fetchone():
                return "deleted_before"
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

    def delete_correction(self, project: int, annotation_id: int) -> bool:
        """Remove an annotation's correction and leave a tombstone; True when something was removed."""
        with self.write() as con:
            cur = con.execute(
                "DELETE FROM corrections WHERE project = ? AND annotation_id = ?", (project, annotation_id)
            )
            con.execute(
                "INSERT OR IGNORE INTO tombstones (project, annotation_id, deleted) VALUES (?, ?, ?)",
                (project, annotation_id, time.time()),
            )
            removed = cur.rowcount > 0
            if removed:
                self._bump(con, project)
        return removed

    def set_image_hash(self, project: int, annotation_id: int, image_hash: str) -> None:
        """Fill in the content hash once the fine-tune job has read the image (not a content change)."""
        with self.write() as con:
            con.execute(
                "UPDATE corrections SET image_hash = ? WHERE project = ? AND annotation_id = ?",
                (image_hash, project, annotation_id),
            )

    def corrections(self, project: int) -> list[Correction]:
        """The project's corrections, one per task (the most recently updated annotation wins), by task id."""
        with self.connect() as con:
            rows = con.execute(
                "SELECT project, annotation_id, task_id, group_key, image_url, image_hash, mask_png, width, "
                "height, empty, updated FROM corrections WHERE project = ? ORDER BY task_id, updated, "
                "annotation_id",
                (project,),
            ).fetchall()
        latest: dict[int, Correction] = {}
        for r in rows:
            mask = png_to_mask(r[6]) if r[6] is not None else None
            latest[r[2]] = Correction(r[0], r[1], r[2], r[3], r[4], r[5], mask, r[7], r[8], bool(r[9]), r[10])
        return [latest[t] for t in sorted(latest)]

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
