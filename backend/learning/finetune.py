"""A project's fine-tune, from its corrections to a promoted (or rejected) version.

:func:`run_finetune` is the body of the fine-tune job (:mod:`backend.jobs.finetuning` runs it on a worker):
corrections and their images in, a candidate head trained, scored against the active version on the
held-out corrections, written atomically, registered, and activated only on evidence
(:func:`cosod.finetune.is_better`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cosod.imageio import DEFAULT_MAX_PIXELS

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
    max_context: int = 24,
    min_corrections: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
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

    A stored correction that cannot be used (over ``max_pixels``, the ``COSOD_MAX_IMAGE_PIXELS`` limit, or
    an unreadable mask: e.g. a row stored before the webhook checked sizes) is skipped, logged, and listed
    in the summary under ``skipped_corrections`` (``[{project, annotation_id, task_id, reason}]``); the
    fine-tune goes on with the others.
    """
    from cosod import finetune as ft
    from cosod.pipeline import describe

    if promote_metric not in ft.HIGHER_IS_BETTER:
        raise ValueError(
            f"unknown promotion metric {promote_metric!r}; known: {', '.join(ft.HIGHER_IS_BETTER)}"
        )
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
    }
    if bad:
        log.warning(
            "project %s: %d stored correction(s) skipped (annotations %s); see skipped_corrections",
            project_id,
            len(bad),
            ", ".join(str(b.annotation_id) for b in bad[:10]) + (" ..." if len(bad) > 10 else ""),
        )
    members = _corrected_images(project_id, store, corrections, read_image)
    if list_group_tasks is not None and members:
        corrected = {c.task_id for c in corrections}
        _add_context(
            project_id,
            members,
            list_group_tasks(project_id),
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
        key = encode_group_key(group_key(t.data, group_by))
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
