"""A project's fine-tune, from its corrections to a promoted (or rejected) version.

:func:`run_finetune` is the body of the fine-tune job (:mod:`backend.jobs.finetuning` runs it on a worker):
corrections and their images in, a candidate head trained, scored against the active version on the
held-out corrections, written atomically, registered, and activated only on evidence: enough held-out
images and a paired bootstrap of the per-image gain (:func:`cosod.promotion.decide`).

Killed fine-tunes: :func:`run_finetune` holds the project's lock (:meth:`~.versions.Registry.locked`) and
a marker in it from start to end; an exception clears the marker, a kill cannot. The next fine-tune of the
project (a re-queued job) finds the marker, deletes the orphans the killed one left (an unregistered
checkpoint, a temp file) and does the work again; :func:`interrupted_finetunes`, run when a process
starts, does the same for projects no job is re-running and says which fine-tunes to queue again.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cosod.imageio import DEFAULT_MAX_PIXELS
from cosod.promotion import MIN_HELDOUT, PromotionRule, decide

from ..grouping import TaskRef, group_key
from .corrections import encode_group_key
from .store import Store
from .versions import Registry, VersionRecord

log = logging.getLogger(__name__)


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
    promote_min_heldout: int = MIN_HELDOUT,
    max_context: int = 24,
    min_corrections: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
    owner: str = "",
) -> dict[str, Any]:
    """The fine-tune job of a project (a plain function; the queue runs it, at most one per project).

    Reads the project's corrections and their images (``read_image(url, task_id)`` -> HxWx3 uint8; fills in
    the image hashes), adds up to ``max_context`` uncorrected members per group from ``list_group_tasks``
    (``project -> TaskRef list``, optional), fine-tunes a copy of the active head
    (:func:`cosod.finetune.finetune`, ``config`` a FinetuneConfig), scores active and candidate on the
    held-out corrections, writes the candidate atomically, registers it, and activates it only on the
    evidence of :func:`cosod.promotion.decide` (at least ``promote_min_heldout`` held-out images, and the
    bootstrap's lower bound of the mean per-image gain on ``promote_metric`` above ``promote_margin``),
    recorded as the version's ``evidence`` and summed up in its ``decision``. The project's change
    counter is reset (to what was read at the start) in the registration transaction. Returns a summary.
    A crash at any point leaves the active version serving and no registered half-written checkpoint.

    A stored correction that cannot be used (over ``max_pixels``, the ``COSOD_MAX_IMAGE_PIXELS`` limit, or
    an unreadable mask: e.g. a row stored before the webhook checked sizes) is skipped, logged, and listed
    in the summary under ``skipped_corrections`` (``[{project, annotation_id, task_id, reason}]``); the
    fine-tune goes on with the others.

    It runs holding the project's lock (waiting while another fine-tune of the project holds it) with a
    marker naming ``owner`` (the job id); when it finds the marker of a killed run, it deletes that run's
    orphaned files first and the summary says so under ``recovered`` (``{interrupted: the marker, removed:
    [file names], starts}``). The candidate's number is taken under the lock after that clean-up, so the
    registered versions are numbered v1, v2, ... without a gap or a repeat.
    """
    from cosod import finetune as ft
    from cosod.pipeline import describe

    rule = PromotionRule(metric=promote_metric, margin=promote_margin, min_heldout=promote_min_heldout)
    with claim_project(registry, project_id, owner) as claim:
        t0 = time.perf_counter()
        cfg = config or ft.FinetuneConfig()
        model = base_pipeline.config.model
        seq = store.change_seq(project_id)
        corrections, bad = store.load_corrections(project_id, max_pixels=max_pixels)
        summary: dict[str, Any] = {
            "project": project_id,
            "corrections": len(corrections),
            "trained_seq": seq,
            "skipped_corrections": [b.as_dict() for b in bad],
            **claim.summary(),
        }
        if bad:
            log.warning(
                "project %s: %d stored correction(s) skipped (annotations %s); see skipped_corrections",
                project_id,
                len(bad),
                ", ".join(str(b.annotation_id) for b in bad[:10]) + (" ..." if len(bad) > 10 else ""),
            )
        listed = list(list_group_tasks(project_id)) if list_group_tasks is not None else None
        if listed is not None:  # each correction in its task's group under the rule of today
            now = {t.id: encode_group_key(group_key(t.data, group_by, image_key)) for t in listed}
            corrections = [replace(c, group_key=now.get(c.task_id, c.group_key)) for c in corrections]
        members = _corrected_images(project_id, store, corrections, read_image)
        if listed is not None and members:
            corrected = {c.task_id for c in corrections}
            _add_context(
                project_id,
                members,
                listed,
                corrected,
                read_image,
                group_by,
                image_key,
                max_context,
            )
        groups = _groups(members)
        n_corrected = sum(m is not None for g in groups for m in g.masks)
        summary["images"] = sum(len(g.images) for g in groups)
        _stage(progress, "loaded", groups=len(groups), corrected=n_corrected, skipped=len(bad))
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
        active_held = ft.score_heldout(active_pipe, groups, held)
        cand_held = ft.score_heldout(ft.head_pipeline(base_pipeline, result.head), groups, held)
        active_scores, cand_scores = active_held.summary, cand_held.summary
        evidence = decide(cand_held.metric(rule.metric), active_held.metric(rule.metric), rule).as_dict()
        promoted, decision = bool(evidence["promoted"]), str(evidence["decision"])
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
            "metrics": {
                "train": result.train_metrics,
                "heldout": cand_scores,
                "active_heldout": active_scores,
                "promotion": {k: v for k, v in evidence.items() if k != "images"},
            },
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
            evidence=evidence,
            data_ids=record["data_ids"],
            heldout_ids=sorted(held),
            config=record["config"],
            train_metrics=result.train_metrics,
        )
        rec = registry.register(rec, activate=promoted, trained_seq=seq)
        promoted, decision = rec.status == "active", rec.decision  # not when promoted by hand meanwhile
        registry.record_scores(project_id, active_version, active_scores)
        _stage(progress, "registered", version=version, promoted=promoted)
        log.info("project %s: %s (%s)", project_id, version, decision)
        return {
            **summary,
            "status": "promoted" if promoted else "rejected",
            "version": version,
            "parent": active_version,
            "active": registry.active_name(project_id),
            "decision": decision,
            "evidence": evidence,
            "scores": cand_scores,
            "active_scores": active_scores,
            "heldout": len(held),
            "train_images": len(result.train_hashes),
            "seconds": time.perf_counter() - t0,
            "train_seconds": result.seconds,
            "pending_after": store.pending(project_id),
        }


@dataclass
class Claim:
    """A fine-tune's hold on its project: ``previous`` the marker of the killed run(s) before it (None
    when the last run ended), ``removed`` the orphaned files deleted, ``starts`` the runs in a row without
    an end, this one included."""

    previous: dict[str, Any] | None
    removed: list[str] = field(default_factory=list)
    starts: int = 1

    def summary(self) -> dict[str, Any]:
        if self.previous is None and not self.removed:
            return {}
        return {"recovered": {"interrupted": self.previous, "removed": self.removed, "starts": self.starts}}


def _starts(marker: dict[str, Any] | None) -> int:
    if marker is None:
        return 0
    try:
        return max(1, int(marker.get("starts", 1)))
    except (TypeError, ValueError):
        return 1


@contextmanager
def claim_project(registry: Registry, project_id: int, owner: str = "") -> Iterator[Claim]:
    """Hold the project's lock for a fine-tune: read the marker a killed run left, write this run's, delete
    the orphaned files; on the way out (return or exception, not a kill) clear the marker."""
    with registry.locked(project_id) as held:
        assert held is not None  # waited for it
        previous = held.marker()
        claim = Claim(previous, starts=_starts(previous) + 1)
        held.set_marker(
            {
                "owner": owner,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "starts": claim.starts,
            }
        )
        claim.removed = [f.name for f in registry.remove_orphans(held)]
        if previous is not None:
            log.warning(
                "project %s: the last fine-tune (%s) ended without finishing; starting it again "
                "(run %d in a row), deleted %s",
                project_id,
                previous,
                claim.starts,
                claim.removed or "no file",
            )
        try:
            yield claim
        finally:
            held.set_marker(None)


@dataclass(frozen=True)
class Interrupted:
    """A project whose fine-tune was killed (``marker`` its last run's) or that had orphaned files."""

    project: int
    marker: dict[str, Any] | None
    removed: list[str]
    requeue: bool  # queue the fine-tune again (its killed runs did not use up ``max_starts``)


def interrupted_finetunes(registry: Registry, *, max_starts: int) -> list[Interrupted]:
    """For each project no fine-tune is running on now: delete its orphaned files, and report a fine-tune
    that was killed. One killed ``max_starts`` times in a row is not to be queued again (its marker is
    cleared, an error logged): a fine-tune that kills its process (out of memory) must not loop; the next
    correction or "Start training" queues it afresh."""
    out = []
    for held in registry.idle_projects():
        removed = [f.name for f in registry.remove_orphans(held)]
        marker = held.marker()
        if marker is None and not removed:
            continue
        requeue = marker is not None and _starts(marker) < max_starts
        if marker is not None and not requeue:
            log.error(
                "project %s: the fine-tune was killed %d times in a row (last: %s); not queued again until "
                "the next correction or Start training",
                held.project,
                _starts(marker),
                marker,
            )
            held.set_marker(None)
        out.append(Interrupted(held.project, marker, removed, requeue))
    return out


Member = tuple[int, np.ndarray, str, "np.ndarray | None"]  # task id, image, image hash, mask (None: context)


def _corrected_images(
    project_id: int, store: Store, corrections: Sequence[Any], read_image: Callable[[str, int], np.ndarray]
) -> dict[str, list[Member]]:
    """Group key -> the corrected images with their masks at the image's size; the image hashes are filled
    in the store. An image that cannot be read is skipped (one must not sink the job)."""
    from cosod.features import image_hash
    from cosod.refine import resize_mask

    members: dict[str, list[Member]] = {}
    for c in corrections:
        try:
            img = read_image(c.image_url, c.task_id)
        except Exception as exc:
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
    return members


def _add_context(
    project_id: int,
    members: dict[str, list[Member]],
    tasks: Sequence[TaskRef],
    corrected: set[int],
    read_image: Callable[[str, int], np.ndarray],
    group_by: str,
    image_key: str,
    max_context: int,
) -> None:
    """Add up to ``max_context`` uncorrected members to each group that has corrections (in place)."""
    from cosod.features import image_hash

    added: dict[str, int] = {}
    for t in tasks:
        key = encode_group_key(group_key(t.data, group_by, image_key))
        if t.id in corrected or key not in members or added.get(key, 0) >= max_context:
            continue
        try:
            img = read_image(str(t.data.get(image_key)), t.id)
        except Exception as exc:
            log.warning("project %s task %s: context image not read (%s)", project_id, t.id, exc)
            continue
        members[key].append((t.id, img, image_hash(img), None))
        added[key] = added.get(key, 0) + 1


def _groups(members: dict[str, list[Member]]) -> list[Any]:
    """:class:`cosod.finetune.FinetuneGroup` per group key, each image once (by hash)."""
    from cosod import finetune as ft

    groups = []
    for key, rows in sorted(members.items()):
        unique: list[Member] = []
        seen: set[str] = set()
        for row in rows:  # the first row of each image hash, in order
            if row[2] not in seen:
                seen.add(row[2])
                unique.append(row)
        groups.append(
            ft.FinetuneGroup(key, [r[1] for r in unique], [r[2] for r in unique], [r[3] for r in unique])
        )
    return groups


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
