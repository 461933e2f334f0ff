"""Model versions per project: checkpoints, their record, the active version, and promotion.

Names: the base model keeps its ``<model>-p<project>-<8 hex>`` name (``CoSODModel.model_version``) and is
registered, with no checkpoint, as the parent of the first fine-tune; fine-tuned versions are
``<model>-p<project>-v<n>`` (n = 1, 2, ... per project). A version's checkpoint lives at
``MODEL_DIR/versions/p<project>/<version>.pt``, written atomically *before* its row is inserted, so a crash
leaves at most an unregistered file and never a registered half-written one. The row holds the record
(parent, data ids, config, training metrics, held-out scores, promotion decision) as JSON.

Serving: :meth:`Registry.serving` gives ``(pipeline, version)`` for a project: the base pipeline and its name
while no fine-tuned version is active (or after a rollback to the base), else a :class:`~cosod.pipeline.
Pipeline` sharing the base pipeline's backbone(s) and feature cache with the active version's head, cached
per (project, version).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .corrections import encode_group_key
from .grouping import TaskRef, group_key
from .store import Store

log = logging.getLogger(__name__)

STATUSES = ("base", "active", "candidate", "rejected", "retired")
_FINETUNED = re.compile(r"^(?P<model>[a-z0-9_]+)-p(?P<project>\d+)-v(?P<n>\d+)$")


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
        """``<model>-p<project>-v<n>`` with n one above the highest fine-tuned version of the project."""
        n = 0
        with self.store.connect() as con:
            for (name,) in con.execute("SELECT version FROM versions WHERE project = ?", (project,)):
                m = _FINETUNED.match(name)
                if m:
                    n = max(n, int(m.group("n")))
        for f in self.root.joinpath(f"p{int(project)}").glob("*.pt"):  # also skip names of orphaned files
            m = _FINETUNED.match(f.stem)
            if m:
                n = max(n, int(m.group("n")))
        return f"{model}-p{int(project)}-v{n + 1}"

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
        rec.status = "active" if activate else "rejected"
        with self.store.write() as con:
            row = con.execute("SELECT version FROM active WHERE project = ?", (rec.project,)).fetchone()
            old = str(row[0]) if row else None
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


# -- the fine-tune job ----------------------------------------------------------------------------------


def _stage(progress: Callable[[str, dict[str, Any]], None] | None, stage: str, **info: Any) -> None:
    log.debug("fine-tune stage %s %s", stage, info)
    if progress:
        progress(stage, info)


def run_finetune(
    project_id: int,
    *,
    store: Store,
    registry: Registry,
    base_pipeline: Any,
    base_version: str,
    read_image: Callable[[str, int], np.ndarray],
    list_group_tasks: Callable[[int], Sequence[TaskRef]] | None = None,
    group_by: str = "auto",
    image_key: str = "image",
    config: Any = None,
    promote_metric: str = "iou",
    promote_margin: float = 0.005,
    max_context: int = 24,
    min_corrections: int = 3,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The fine-tune job of a project (a plain function; the queue runs it, at most one per project).

    Reads the project's corrections and their images (``read_image(url, task_id)`` -> HxWx3 uint8; fills in
    the image hashes), adds up to ``max_context`` uncorrected members per group from ``list_group_tasks``
    (``project -> TaskRef list``, optional), fine-tunes a copy of the active head
    (:func:`cosod.finetune.finetune`, ``config`` a FinetuneConfig), scores active and candidate on the
    held-out corrections, writes the candidate atomically, registers it, and activates it only if
    :func:`cosod.finetune.is_better` on ``promote_metric`` by ``promote_margin``. The project's change
    counter is reset (to what was read at the start) in the registration transaction. Returns a summary.
    A crash at any point leaves the active version serving and no registered half-written checkpoint.
    """
    from cosod import finetune as ft
    from cosod.features import image_hash
    from cosod.pipeline import describe
    from cosod.refine import resize_mask

    if promote_metric not in ft.HIGHER_IS_BETTER:
        raise ValueError(
            f"unknown promotion metric {promote_metric!r}; known: {', '.join(ft.HIGHER_IS_BETTER)}"
        )
    t0 = time.perf_counter()
    cfg = config or ft.FinetuneConfig()
    model = base_pipeline.config.model
    seq = store.change_seq(project_id)
    corrections = store.corrections(project_id)
    summary: dict[str, Any] = {"project": project_id, "corrections": len(corrections), "trained_seq": seq}
    members: dict[str, list[tuple[int, np.ndarray, str, np.ndarray | None]]] = {}
    for c in corrections:
        try:
            img = read_image(c.image_url, c.task_id)
        except Exception as exc:  # one unreadable image must not sink the job
            log.warning(
                "project %s task %s: image %s not read (%s); skipped", project_id, c.task_id, c.image_url, exc
            )
            continue
        digest = image_hash(img)
        if c.image_hash != digest:
            store.set_image_hash(project_id, c.annotation_id, digest)
        hw = img.shape[:2]
        mask = np.zeros(hw, dtype=bool) if c.mask is None else resize_mask(c.mask, hw)
        members.setdefault(c.group_key, []).append((c.task_id, img, digest, mask))
    if list_group_tasks is not None and members:
        corrected = {c.task_id for c in corrections}
        added: dict[str, int] = {}
        for t in list_group_tasks(project_id):
            key = encode_group_key(group_key(t.data, group_by))
            if t.id in corrected or key not in members or added.get(key, 0) >= max_context:
                continue
            url = t.data.get(image_key)
            try:
                img = read_image(str(url), t.id)
            except Exception as exc:
                log.warning("project %s task %s: context image not read (%s)", project_id, t.id, exc)
                continue
            members[key].append((t.id, img, image_hash(img), None))
            added[key] = added.get(key, 0) + 1
    groups = []
    for key, rows in sorted(members.items()):
        seen: set[str] = set()
        rows = [r for r in rows if not (r[2] in seen or seen.add(r[2]))]  # type: ignore[func-returns-value]
        groups.append(ft.FinetuneGroup(key, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]))
    n_corrected = sum(m is not None for g in groups for m in g.masks)
    summary["images"] = sum(len(g.images) for g in groups)
    _stage(progress, "loaded", groups=len(groups), corrected=n_corrected)
    if n_corrected < min_corrections:
        with store.write() as con:
            store.mark_trained(con, project_id, seq)
        return {
            **summary,
            "status": "skipped",
            "reason": f"{n_corrected} usable corrections < {min_corrections}",
        }

    registry.ensure_base(project_id, model, base_version, describe(base_pipeline.config))
    active_pipe, active_version = registry.serving(project_id, base_pipeline, base_version)
    result = ft.finetune(
        active_pipe, groups, cfg, on_step=lambda s, r: _stage(progress, "train", step=s, **r)
    )
    held = set(result.heldout_hashes)
    active_scores = ft.evaluate_heldout(active_pipe, groups, held)
    cand_pipe = ft.head_pipeline(base_pipeline, result.head)
    cand_scores = ft.evaluate_heldout(cand_pipe, groups, held)
    promoted = ft.is_better(cand_scores, active_scores, promote_metric, promote_margin)
    decision = (
        f"{promote_metric}: candidate {cand_scores.get(promote_metric, float('nan')):.4f} vs active "
        f"{active_scores.get(promote_metric, float('nan')):.4f}, margin {promote_margin}: "
        + ("promoted" if promoted else "kept the active version")
    )
    _stage(progress, "evaluated", candidate=cand_scores, active=active_scores)

    version = registry.next_version(project_id, model)
    path = registry.checkpoint_path(project_id, version)
    record: dict[str, Any] = {
        "parent": active_version,
        "config": {
            "finetune": asdict(cfg),
            "pipeline": describe(base_pipeline.config),
            "backbone_id": base_pipeline.backbone.id,
        },
        "data_ids": sorted(result.train_hashes),
        "metrics": {"train": result.train_metrics, "heldout": cand_scores, "active_heldout": active_scores},
    }
    _save_head(model, base_pipeline, result.head, path, record)
    _stage(progress, "saved", version=version, path=str(path))
    rec = VersionRecord(
        project_id,
        version,
        model,
        parent=active_version,
        path=str(path),
        scores=cand_scores,
        active_scores=active_scores,
        latest_scores=cand_scores,
        promoted=promoted,
        decision=decision,
        data_ids=record["data_ids"],
        heldout_ids=sorted(held),
        config=record["config"],
        train_metrics=result.train_metrics,
    )
    registry.register(rec, activate=promoted, trained_seq=seq)
    registry.record_scores(project_id, active_version, active_scores)
    _stage(progress, "registered", version=version, promoted=promoted)
    log.info("project %s: %s (%s)", project_id, version, decision)
    return {
        **summary,
        "status": "promoted" if promoted else "rejected",
        "version": version,
        "parent": active_version,
        "active": version if promoted else active_version,
        "decision": decision,
        "scores": cand_scores,
        "active_scores": active_scores,
        "heldout": len(held),
        "train_images": len(result.train_hashes),
        "seconds": time.perf_counter() - t0,
        "train_seconds": result.seconds,
        "pending_after": store.pending(project_id),
    }


def _save_head(model: str, base_pipeline: Any, head: Any, path: Path, record: dict[str, Any]) -> None:
    """Write the candidate's checkpoint atomically with its parent, data ids, metrics and config."""
    from cosod.methods import HeadRecord, get_method

    get_method(model).save_head(
        head,
        path,
        HeadRecord(
            parent=record["parent"],
            config=record["config"],
            data_ids=record["data_ids"],
            metrics=record["metrics"],
        ),
        base_pipeline.backbones,
    )
