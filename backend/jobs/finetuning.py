"""The fine-tune job: one per project at a time, queued by :func:`schedule_finetune` when the webhook has
stored ``COSOD_TRAIN_EVERY`` corrections (or on START_TRAINING) and the project has at least
``COSOD_FINETUNE_MIN_CORRECTIONS``; the work itself is :func:`backend.learning.finetune.run_finetune`.

Killed fine-tunes are done again. The job is queued with ``COSOD_JOB_RETRIES`` retries, so when its
worker dies the reaper of a live worker re-queues it (about two heartbeats later), and the next run deletes
the files the killed one left (see :mod:`backend.learning.finetune`). :func:`recover_finetunes`, called
when a process starts, covers what the queue cannot see: Redis lost its record, or the jobs ran in a
process that was killed (no ``REDIS_URL``). It deletes orphaned files of every project no fine-tune is
running on and queues again each killed fine-tune that has runs left.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from ..errors import BackendError, JobQueueError, PermanentJobError, TransientJobError
from ..settings import Settings
from . import queue as jobqueue
from .context import JobContext, context, project_state, retrying

log = logging.getLogger(__name__)


def finetune_job_id(project_id: int) -> str:
    return f"finetune-p{project_id}"


def finetune(project_id: int) -> dict[str, Any]:
    """Fine-tune the project's active version on its corrections, score it against the active one on the
    held-out corrections, and promote it only if it is better (``backend.learning.finetune.run_finetune``)."""
    from cosod.finetune import FinetuneConfig

    from ..learning.finetune import run_finetune

    ctx = context()
    s = ctx.settings
    project = project_state(ctx, project_id)
    base = ctx.loader.require(timeout=600.0, model=project.model)
    base_version = ctx.model.model_version(project_id, base)

    def progress(stage: str, info: dict[str, Any]) -> None:
        jobqueue.set_meta(stage=stage, **{k: v for k, v in info.items() if isinstance(v, int | float | str)})

    try:
        result = run_finetune(
            project_id,
            store=ctx.model.store,
            registry=ctx.model.registry,
            base_pipeline=base,
            base_version=base_version,
            read_image=lambda url, task_id: retrying(
                ctx,
                f"reading the image of task {task_id}",
                lambda: ctx.ls.read_image(url, task_id, project_id=project_id),
            ),
            list_group_tasks=lambda pid: ctx.model.similar.tag(  # a no-op unless the rule is `similar`
                project,
                retrying(
                    ctx,
                    f"listing the tasks of project {pid}",
                    lambda: ctx.ls.project_tasks(pid, refresh=True),
                ),
            ),
            group_by=project.group_by,
            image_key=project.config.image_key,
            config=FinetuneConfig(
                steps=s.finetune_steps, lr=s.finetune_lr, heldout_fraction=s.heldout_fraction
            ),
            promote_metric=s.promote_metric,
            max_pixels=s.max_image_pixels,
            promote_margin=s.promote_margin,
            promote_min_heldout=s.promote_min_heldout,
            min_corrections=s.finetune_min_corrections,
            progress=progress,
            owner=finetune_job_id(project_id),
        )
    except (jobqueue.JobCanceledError, jobqueue.JobTimeoutError, TransientJobError):
        raise
    except (BackendError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        jobqueue.give_up(reason)
        raise PermanentJobError(reason) from None
    log.info("project %s: fine-tune %s", project_id, result.get("status"))
    return result


def enqueue_finetune(settings: Settings, project_id: int) -> str:
    """Enqueue the project's fine-tune unless one is already queued or running (one id per project, not
    kept once finished, so the next batch of corrections can start the next one). Returns the job id.
    ``COSOD_JOB_RETRIES`` retries: a run whose worker died is run again."""
    return _enqueue(settings, project_id).job_id


def schedule_finetune(settings: Settings, project_id: int) -> dict[str, Any]:
    """:func:`enqueue_finetune` for the webhook, saying what happened: ``{"job": id, "finetune_job": id,
    "finetune_state": the job's status now (queued, started...), "finetune_new": False when one was already
    queued or running, "message": one line}``. Raises :class:`JobQueueError` when the queue is down."""
    enq = _enqueue(settings, project_id)
    try:
        info = jobqueue.get_queue(settings).fetch(enq.job_id)
    except JobQueueError:  # enqueued a moment ago: the state is the only thing not known
        info = None
    state = info.status if info is not None else "queued"
    follow = f"follow it: GET /jobs/{enq.job_id} or `cosod-backend jobs --project {project_id}`"
    message = (
        f"fine-tune {enq.job_id} {state}; {follow}"
        if enq.created
        else f"a fine-tune is already {'running' if state == 'started' else state}: {enq.job_id}; {follow}"
    )
    return {
        "job": enq.job_id,
        "finetune_job": enq.job_id,
        "finetune_state": state,
        "finetune_new": enq.created,
        "message": message,
    }


def _enqueue(settings: Settings, project_id: int) -> jobqueue.Enqueued:
    q = jobqueue.get_queue(settings)
    enq = q.enqueue(
        finetune,
        project_id,
        job_id=finetune_job_id(project_id),
        timeout=settings.finetune_timeout,
        result_ttl=settings.job_result_ttl,
        failure_ttl=settings.job_failure_ttl,
        retries=settings.job_retries,
        meta={"project": project_id, "kind": "finetune"},
        description=f"fine-tune project {project_id} on its corrections",
        keep_finished=False,
    )
    log.info(
        "project %s: fine-tune %s (%s)", project_id, enq.job_id, "new" if enq.created else "already queued"
    )
    return enq


def recover_finetunes(ctx: JobContext | None = None) -> list[dict[str, Any]]:
    """Run once when a worker (or the API, for its in-process queue) starts, and as often as wanted after:
    for each project no fine-tune is running on, delete the orphaned checkpoint and temp files, and queue
    again a fine-tune that was killed, unless it was killed ``COSOD_JOB_RETRIES + 1`` times in a row
    (asking again for a queued or running one changes nothing). Never raises for an unreachable queue or
    an unreadable MODEL_DIR (logged; the next start or correction does it). Returns one dict per project
    it touched: ``{project, interrupted, removed, job}`` (``job`` None when not queued)."""
    from ..learning.finetune import interrupted_finetunes

    ctx = ctx or context()
    s = ctx.settings
    try:
        interrupted = interrupted_finetunes(ctx.model.registry, max_starts=s.job_retries + 1)
    except (OSError, sqlite3.Error) as exc:  # a start must not fail on a clean-up; the next one retries
        log.error("looking for killed fine-tunes failed: %s", exc)
        return []
    out = []
    for found in interrupted:
        job = None
        if found.requeue:
            try:
                job = enqueue_finetune(s, found.project)
            except JobQueueError as exc:
                log.warning("project %s: the killed fine-tune is not queued again: %s", found.project, exc)
        out.append(
            {"project": found.project, "interrupted": found.marker, "removed": found.removed, "job": job}
        )
    if out:
        log.info("fine-tunes recovered at start: %s", out)
    return out
