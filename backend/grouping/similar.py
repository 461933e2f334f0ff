"""The ``similar`` grouping rule: groups formed from the images' own features, stable as a project grows.

**Descriptor** (computed by :mod:`backend.prediction.similar` from the backbone features the pipeline caches):
per image, the mean of its L2-normalised patch tokens weighted by the CLS attention map, L2-normalised, a
float32 vector of the backbone's width. The attention weighting makes the salient object, not the
background, decide the group.

**Assignment** (:func:`assign`; deterministic: the same descriptors in the same order give the same groups):

1. New tasks are taken in id order. Each joins the group whose centroid (the normalised mean of its members'
   descriptors) is the most similar (cosine), when that similarity is at least ``threshold`` and the group has
   fewer than ``max_size`` members; otherwise it starts a new group. Ties go to the lowest group id.
2. A group started in this pass that ends it with fewer than ``min_size`` members is dissolved, smallest
   first: each of its tasks joins the most similar other group with room, whatever the similarity; when no
   group has room, the group stays as it is.
3. What is stored never changes: a task keeps its group, and group ids (``s1``, ``s2``, ... per project)
   are never reused. A task imported later joins the nearest group or starts a new one by the same rules.
4. Groups belong to a feature space (the backbone id): a task joins only groups of its own space, so a new
   backbone starts new groups and the tasks grouped before keep theirs.

:class:`SimilarGroups` keeps the assignments in a SQLite file (``<MODEL_DIR>/groups.sqlite3``); assignment
runs in one ``BEGIN IMMEDIATE`` transaction, so processes that assign at the same time never disagree: the
second one finds the first one's tasks assigned.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE_NAME = "groups.sqlite3"
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS similar_groups (
    project INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    space TEXT NOT NULL,
    n INTEGER NOT NULL,
    total BLOB NOT NULL,
    PRIMARY KEY (project, gid)
);
CREATE TABLE IF NOT EXISTS similar_tasks (
    project INTEGER NOT NULL,
    task_id INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    PRIMARY KEY (project, task_id)
);
"""


def group_name(gid: int) -> str:
    """The group value tasks of group ``gid`` carry (``s1``, ``s2``, ...)."""
    return f"s{gid}"


@dataclass
class Cluster:
    """A group as assignment sees it: the sum of its members' descriptors (float64) and their number."""

    total: np.ndarray
    n: int

    def centroid(self) -> np.ndarray:
        norm = float(np.linalg.norm(self.total))
        return self.total / norm if norm > 0 else self.total


def normalised(vector: np.ndarray) -> np.ndarray:
    """``vector`` as a float64 unit vector (an all-zero or non-finite one stays zero: it matches nothing)."""
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        return np.zeros_like(v)
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


def assign(
    clusters: dict[int, Cluster],
    new: Iterable[tuple[int, np.ndarray]],
    *,
    threshold: float,
    min_size: int,
    max_size: int,
    first_gid: int | None = None,
) -> dict[int, int]:
    """Assign ``new`` (task id, descriptor) pairs to ``clusters`` (group id -> :class:`Cluster`, updated in
    place, new groups added with the next ids, from ``first_gid`` when given) by the module's rules.
    Returns task id -> group id."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size!r} and {max_size!r}")
    vectors = {tid: normalised(v) for tid, v in sorted(new, key=lambda p: p[0])}
    dims = {v.shape[0] for v in vectors.values()} | {c.total.shape[0] for c in clusters.values()}
    if len(dims) > 1:
        raise ValueError(f"descriptors of different widths {sorted(dims)}: was the backbone changed?")
    old = set(clusters)
    next_gid = max(max(clusters, default=0) + 1, first_gid or 1)
    out: dict[int, int] = {}
    members: dict[int, list[int]] = {}

    def best(v: np.ndarray, among: Iterable[int]) -> tuple[int | None, float]:
        choice, score = None, -2.0
        for gid in sorted(among):
            c = clusters[gid]
            if c.n >= max_size:
                continue
            sim = float(c.centroid() @ v)
            if sim > score + 1e-12:
                choice, score = gid, sim
        return choice, score

    for tid, v in vectors.items():
        gid, sim = best(v, clusters)
        if gid is None or sim < threshold:
            gid = next_gid
            next_gid += 1
            clusters[gid] = Cluster(np.zeros_like(v), 0)
        clusters[gid].total = clusters[gid].total + v
        clusters[gid].n += 1
        out[tid] = gid
        members.setdefault(gid, []).append(tid)
    small = sorted(
        (g for g in members if g not in old and clusters[g].n < min_size), key=lambda g: (clusters[g].n, g)
    )
    for gid in small:
        if clusters[gid].n >= min_size:  # grew by taking in a dissolved group's tasks
            continue
        others = [g for g in clusters if g != gid and clusters[g].n > 0]
        for tid in list(members[gid]):
            target, _ = best(vectors[tid], others)
            if target is None:
                break
            clusters[gid].total = clusters[gid].total - vectors[tid]
            clusters[gid].n -= 1
            clusters[target].total = clusters[target].total + vectors[tid]
            clusters[target].n += 1
            members[gid].remove(tid)
            members.setdefault(target, []).append(tid)
            out[tid] = target
        if clusters[gid].n == 0:
            del clusters[gid]
    return out


class SimilarGroups:
    """The stored ``similar`` assignments of every project, in ``<model_dir>/groups.sqlite3``."""

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir) / FILE_NAME
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            db.executescript(_SCHEMA)
            self._local.db = db
        return db

    def lookup(self, project: int, task_ids: Iterable[int] | None = None) -> dict[int, str]:
        """Task id -> group value (``s<gid>``) of the project's assigned tasks (of ``task_ids`` only, when
        given)."""
        rows = (
            self._db()
            .execute("SELECT task_id, gid FROM similar_tasks WHERE project = ?", (project,))
            .fetchall()
        )
        wanted = None if task_ids is None else set(task_ids)
        return {t: group_name(g) for t, g in rows if wanted is None or t in wanted}

    def assign(
        self,
        project: int,
        descriptors: Mapping[int, np.ndarray],
        *,
        space: str = "",
        threshold: float,
        min_size: int,
        max_size: int,
        persist: bool = True,
    ) -> dict[int, str]:
        """Assign the tasks of ``descriptors`` not assigned yet (one transaction) and return the whole
        project's task id -> group value. ``space`` names the descriptors' feature space (the backbone id):
        a task joins only groups of its own space, so changing the backbone starts new groups instead of
        comparing unlike vectors (the tasks grouped before keep their groups). ``persist=False`` computes
        the same answer and stores nothing (for tasks Label Studio cannot vouch for)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            known = dict(db.execute("SELECT task_id, gid FROM similar_tasks WHERE project = ?", (project,)))
            new = [(t, v) for t, v in descriptors.items() if t not in known]
            if new:
                rows = db.execute(
                    "SELECT gid, space, n, total FROM similar_groups WHERE project = ?", (project,)
                ).fetchall()
                clusters = {
                    gid: Cluster(np.frombuffer(total, dtype=np.float64).copy(), n)
                    for gid, sp, n, total in rows
                    if sp == space
                }
                first = max((r[0] for r in rows), default=0) + 1
                out = assign(
                    clusters, new, threshold=threshold, min_size=min_size, max_size=max_size, first_gid=first
                )
                known.update(out)
                if persist:
                    db.executemany(
                        "INSERT INTO similar_tasks (project, task_id, gid) VALUES (?, ?, ?)",
                        [(project, t, g) for t, g in out.items()],
                    )
                    db.executemany(
                        "INSERT OR REPLACE INTO similar_groups (project, gid, space, n, total) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [
                            (project, g, space, c.n, c.total.astype(np.float64).tobytes())
                            for g, c in clusters.items()
                        ],
                    )
            db.execute("COMMIT" if persist else "ROLLBACK")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return {t: group_name(g) for t, g in known.items()}
