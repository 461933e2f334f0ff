"""Model versions per project: checkpoints, their record, the active version, and promotion.

Names: the base model keeps its ``<model>-p<project>-<8 hex>`` name (``CoSODModel.model_version``) and is
registered, with no checkpoint, as the parent of the first fine-tune; fine-tuned versions are
``<model>-p<project>-v<n>`` (n = 1, 2, ... per project). A version's checkpoint lives at
``MODEL_DIR/versions/p<project>/<version>.pt``, written atomically *before* its row is inserted, so a crash
leaves at most an unregistered file and never a registered half-written one. The row holds the record
(parent, data ids, config, training metrics, held-out scores, promotion decision and its evidence) as JSON.

Serving: :meth:`Registry.serving` gives ``(pipeline, version)`` for a project: the base pipeline and its name
while no fine-tuned version is active (or after a rollback to the base), else a :class:`~cosod.pipeline.
Pipeline` sharing the base pipeline's backbone(s) and feature cache with the active version's head, cached
per (project, version).

Faults: a fine-tune holds its project's lock (:meth:`Registry.locked`, an ``flock`` on
``versions/p<project>/finetune.lock``) from start to end, so at most one process writes a project's
checkpoints and picks its next number, and the kernel drops the lock when that process dies, even by
SIGKILL. Whoever holds the lock may delete the project's *orphans* (:meth:`Registry.orphans`): checkpoints
named like a fine-tuned version of the project but not registered (a kill between the rename and the
registration) and the temp files of killed writes (``.<version>.pt.<random>.tmp``). The fine-tune deletes
them before it numbers its candidate, so the registered versions of a project are always v1..vN without
a gap or a repeat; :meth:`Registry.idle_projects` lets a process starting up do the same for every project
nobody is fine-tuning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from cosod.atomic import temp_file_target

from .store import Store

log = logging.getLogger(__name__)

STATUSES = ("base", "active", "candidate", "rejected", "retired")
_FINETUNED = re.compile(r"^(?P<model>[a-z0-9_]+)-p(?P<project>\d+)-v(?P<n>\d+)$")
_PROJECT_DIR = re.compile(r"^p(?P<project>0|[1-9]\d*)$")  # as checkpoint_path writes it
LOCK_NAME = "finetune.lock"


@dataclass
class VersionRecord:
    """One model version of a project. ``scores``: its held-out scores when it was made; ``active_scores``:
    the then-active version's scores on the same held-out images; ``path`` None for the base model."""

    project: int
    version: str
    model: str
    parent: str | None = None
    path: str | None = None
    status: str = "candidate"
    created: float = field(default_factory=time.time)
    scores: dict[str, Any] = field(default_factory=dict)
    active_scores: dict[str, Any] = field(default_factory=dict)
    latest_scores: dict[str, Any] = field(default_factory=dict)
    promoted: bool = False
    decision: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)  # cosod.promotion.Evidence: n, gains, bound
    data_ids: list[str] = field(default_factory=list)
    heldout_ids: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    train_metrics: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row_to_record(row: tuple[Any, ...]) -> VersionRecord:
    rec = json.loads(row[0])
    rec["status"] = row[1]
    return VersionRecord(**rec)


class ProjectLock:
    """A held lock on one project's checkpoints (see :meth:`Registry.locked`). The lock file also carries
    a marker: a JSON object its holder writes and clears; one found by the next holder was left by a holder
    that died (the kernel released its lock, nobody cleared the marker)."""

    def __init__(self, project: int, f: IO[bytes]):
        self.project = project
        self._f = f

    def marker(self) -> dict[str, Any] | None:
        """The marker, or None when clear. A marker that is not a JSON object reads as ``{}``."""
        self._f.seek(0)
        raw = self._f.read()
        if not raw.strip():
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    def set_marker(self, value: dict[str, Any] | None) -> None:
        """Write (``None``: clear) the marker, durably."""
        self._f.seek(0)
        self._f.truncate()
        if value is not None:
            self._f.write(json.dumps(value).encode())
        self._f.flush()
        os.fsync(self._f.fileno())


def _flock(f: IO[bytes], wait: float | None) -> bool:
    """Lock ``f`` exclusively; ``wait`` None: until it is free, else give up after ``wait`` seconds."""
    if wait is None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        return True
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.2, left))


class Registry:
    """Versions of every project, in the store's SQLite file; checkpoints under ``store.root/versions``."""

    def __init__(self, store: Store, *, cache_size: int = 8):
        self.store = store
        self.root = store.root / "versions"
        self._lock = threading.Lock()
        self._pipelines: dict[tuple[int, str], Any] = {}
        self._cache_size = cache_size

    # -- names and paths ------------------------------------------------------------------------------
    def checkpoint_path(self, project: int, version: str) -> Path:
        return self.root / f"p{int(project)}" / f"{version}.pt"

    def next_version(self, project: int, model: str) -> str:
        """``<model>-p<project>-v<n>`` with n one above the highest fine-tuned version of the project. Ask
        while holding :meth:`locked`, after :meth:`remove_orphans`: then n follows the registered versions
        without a gap, and nobody else can take it before it is registered."""
        n = 0
        with self.store.connect() as con:
            for (name,) in con.execute("SELECT version FROM versions WHERE project = ?", (project,)):
                m = _FINETUNED.match(name)
                if m:
                    n = max(n, int(m.group("n")))
        # a checkpoint :meth:`remove_orphans` could not delete keeps its name (never overwritten)
        for f in self.root.joinpath(f"p{int(project)}").glob("*.pt"):
            m = _FINETUNED.match(f.stem)
            if m:
                n = max(n, int(m.group("n")))
        return f"{model}-p{int(project)}-v{n + 1}"

    # -- the project lock and orphaned files ---------------------------------------------------------
    @contextmanager
    def locked(self, project: int, *, wait: float | None = None) -> Iterator[ProjectLock | None]:
        """Hold the project's lock (``flock``, so it works across processes and threads of one process,
        and dies with its holder); ``wait`` None waits until it is free, else yields None if it is still
        held by someone else after ``wait`` seconds (0: do not wait)."""
        folder = self.root / f"p{int(project)}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK_NAME, "a+b") as f:
            if not _flock(f, wait):
                yield None
                return
            try:
                yield ProjectLock(int(project), f)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def idle_projects(self) -> Iterator[ProjectLock]:
        """The lock of each project with a checkpoint folder that nobody holds now, held while the caller
        handles it (projects being fine-tuned are passed over)."""
        if not self.root.is_dir():
            return
        found = (_PROJECT_DIR.match(f.name) for f in self.root.iterdir() if f.is_dir())
        for project in sorted(int(m.group("project")) for m in found if m):
            with self.locked(project, wait=0) as held:
                if held is None:
                    log.debug("project %s: a fine-tune holds its lock; left alone", project)
                    continue
                yield held

    def orphans(self, project: int) -> list[Path]:
        """The project's files no version owns: temp files of a checkpoint write that never finished, and
        checkpoints named like one of its fine-tuned versions that is not registered. Delete them only
        while holding :meth:`locked` (a fine-tune at work owns such files until it registers)."""
        folder = self.root / f"p{int(project)}"
        if not folder.is_dir():
            return []
        with self.store.connect() as con:
            rows = con.execute("SELECT version FROM versions WHERE project = ?", (project,)).fetchall()
        registered = {str(r[0]) for r in rows}
        out = []
        for f in sorted(folder.iterdir()):
            target = temp_file_target(f.name)
            name = f.name if target is None else target
            m = _FINETUNED.match(name[: -len(".pt")]) if name.endswith(".pt") else None
            if m is None or int(m.group("project")) != int(project) or not f.is_file():
                continue
            if target is not None or m.group(0) not in registered:
                out.append(f)
        return out

    def remove_orphans(self, held: ProjectLock) -> list[Path]:
        """Delete the orphans of the locked project (see :meth:`orphans`); returns what was deleted."""
        removed = []
        for f in self.orphans(held.project):
            try:
                size = f.stat().st_size
                f.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:  # next_version still skips a checkpoint's name; retried next time
                log.error("project %s: cannot delete the orphaned %s: %s", held.project, f, exc)
                continue
            log.warning("project %s: deleted the orphaned %s (%d bytes)", held.project, f.name, size)
            removed.append(f)
        return removed

    # -- reading --------------------------------------------------------------------------------------
    def get(self, project: int, version: str) -> VersionRecord | None:
        with self.store.connect() as con:
            row = con.execute(
                "SELECT record, status FROM versions WHERE project = ? AND version = ?", (project, version)
            ).fetchone()
        return _row_to_record(row) if row else None

    def list_versions(self, project: int) -> list[VersionRecord]:
        """All versions of a project, oldest first, with their status and scores."""
        with self.store.connect() as con:
            rows = con.execute(
                "SELECT record, status FROM versions WHERE project = ? ORDER BY created, version", (project,)
            ).fetchall()
        return [_row_to_record(r) for r in rows]

    def active_name(self, project: int) -> str | None:
        """The name of the active version, or None while the base model serves (nothing registered)."""
        with self.store.connect() as con:
            row = con.execute("SELECT version FROM active WHERE project = ?", (project,)).fetchone()
        return str(row[0]) if row else None

    def active(self, project: int) -> VersionRecord | None:
        name = self.active_name(project)
        return self.get(project, name) if name else None

    # -- writing --------------------------------------------------------------------------------------
    def ensure_base(
        self, project: int, model: str, base_version: str, config: dict[str, Any]
    ) -> VersionRecord:
        """Register the base model (no checkpoint) if missing, and make it active when nothing is."""
        rec = self.get(project, base_version)
        with self.store.write() as con:
            if rec is None:
                rec = VersionRecord(project, base_version, model, status="base", config=config)
                con.execute(
                    "INSERT OR IGNORE INTO versions (project, version, model, parent, path, status, created, "
                    "record) VALUES (?, ?, ?, NULL, NULL, 'base', ?, ?)",
                    (project, base_version, model, rec.created, json.dumps(rec.as_dict())),
                )
            con.execute(
                "INSERT OR IGNORE INTO active (project, version, changed) VALUES (?, ?, ?)",
                (project, base_version, time.time()),
            )
        return rec

    def register(
        self, rec: VersionRecord, *, activate: bool, trained_seq: int | None = None
    ) -> VersionRecord:
        """Insert a version whose checkpoint is already on disk; activate it, and mark the project's changes
        up to ``trained_seq`` as trained, in the same transaction. Raises ValueError if the name exists."""
        if rec.path is not None and not Path(rec.path).is_file():
            raise ValueError(f"checkpoint of {rec.version} not found at {rec.path}")
        with self.store.write() as con:
            row = con.execute("SELECT version FROM active WHERE project = ?", (rec.project,)).fetchone()
            old = str(row[0]) if row else None
            if activate and rec.parent is not None and old is not None and old != rec.parent:
                # promoted or rolled back by hand while it trained: its evidence is against another version
                activate = False
                rec.decision = (
                    f"kept: the active version changed from {rec.parent} to {old} during the fine-tune "
                    f"(it was measured against {rec.parent}); promote it by hand if wanted"
                )
            rec.status = "active" if activate else "rejected"
            try:
                con.execute(
                    "INSERT INTO versions (project, version, model, parent, path, status, created, record) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        rec.project,
                        rec.version,
                        rec.model,
                        rec.parent,
                        rec.path,
                        rec.status,
                        rec.created,
                        json.dumps(rec.as_dict()),
                    ),
                )
            except Exception as exc:
                raise ValueError(f"version {rec.version!r} of project {rec.project} exists: {exc}") from exc
            if activate:
                self._set_active(con, rec.project, rec.version, old)
            if trained_seq is not None:
                self.store.mark_trained(con, rec.project, trained_seq)
        return rec

    def _set_active(self, con: Any, project: int, version: str, old: str | None) -> None:
        con.execute(
            "INSERT OR REPLACE INTO active (project, version, changed) VALUES (?, ?, ?)",
            (project, version, time.time()),
        )
        con.execute(
            "UPDATE versions SET status = 'active' WHERE project = ? AND version = ?", (project, version)
        )
        if old and old != version:
            con.execute(
                "UPDATE versions SET status = CASE WHEN path IS NULL THEN 'base' ELSE 'retired' END "
                "WHERE project = ? AND version = ?",
                (project, old),
            )

    def promote(self, project: int, version: str) -> VersionRecord:
        """Make a registered version active (roll back or forward). Raises ValueError for an unknown one."""
        rec = self.get(project, version)
        if rec is None:
            known = [r.version for r in self.list_versions(project)]
            raise ValueError(f"project {project} has no version {version!r}; known: {known}")
        if rec.path is not None and not Path(rec.path).is_file():
            raise ValueError(f"the checkpoint of {version!r} is missing at {rec.path}")
        with self.store.write() as con:
            row = con.execute("SELECT version FROM active WHERE project = ?", (project,)).fetchone()
            self._set_active(con, project, version, str(row[0]) if row else None)
        log.info("project %s: version %s is now active", project, version)
        return self.get(project, version) or rec

    def record_scores(self, project: int, version: str, scores: dict[str, Any]) -> None:
        """Remember a version's latest held-out scores (``latest_scores`` in its record, for /versions)."""
        with self.store.write() as con:
            row = con.execute(
                "SELECT record FROM versions WHERE project = ? AND version = ?", (project, version)
            ).fetchone()
            if row is None:
                return
            rec = json.loads(row[0])
            rec["latest_scores"] = scores
            if not rec.get("scores"):
                rec["scores"] = scores
            con.execute(
                "UPDATE versions SET record = ? WHERE project = ? AND version = ?",
                (json.dumps(rec), project, version),
            )

    # -- serving --------------------------------------------------------------------------------------
    def serving(self, project: int, base_pipeline: Any, base_version: str) -> tuple[Any, str]:
        """``(pipeline, model_version)`` to predict with for a project (see the module doc). A checkpoint
        that cannot be loaded or does not fit the base backbone falls back to the base model, logged."""
        rec = self.active(project)
        if rec is None or rec.path is None:
            return base_pipeline, base_version
        made_on = rec.config.get("backbone_id")
        if made_on and made_on != base_pipeline.backbone.id:
            log.warning(
                "project %s: %s was trained on backbone %s, the base model uses %s; serving the base model",
                project,
                rec.version,
                made_on,
                base_pipeline.backbone.id,
            )
            return base_pipeline, base_version
        key = (project, rec.version)
        with self._lock:
            hit = self._pipelines.get(key)
        if hit is not None and hit[1] is base_pipeline:
            return hit[0], rec.version
        try:
            pipe = load_head_pipeline(base_pipeline, rec.path)
        except Exception as exc:  # a damaged file or another backbone: keep serving the base model
            log.error("project %s: cannot serve %s (%s); serving the base model", project, rec.version, exc)
            return base_pipeline, base_version
        with self._lock:
            self._pipelines[key] = (pipe, base_pipeline)
            while len(self._pipelines) > self._cache_size:
                self._pipelines.pop(next(iter(self._pipelines)))
        return pipe, rec.version


def load_head_pipeline(base_pipeline: Any, path: str | Path) -> Any:
    """A pipeline with the head stored at ``path`` on ``base_pipeline``'s backbone(s) and cache."""
    from dataclasses import replace

    from cosod.finetune import head_pipeline
    from cosod.methods import get_method

    method = get_method(base_pipeline.config.model)
    head = method.load_head(path)
    field = method.checkpoint_field
    cfg = replace(base_pipeline.config, **{field: str(path)}) if field else base_pipeline.config
    return head_pipeline(base_pipeline, head, cfg)
