"""The fine-tune job: one per project at a time, queued by :func:`backend.jobs.enqueue.enqueue_finetune`
when the webhook has stored ``COSOD_TRAIN_EVERY`` corrections (or on START_TRAINING); the work itself is
:func:`backend.learning.finetune.run_finetune`."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import BackendError, PermanentJobError, TransientJobError
from . import queue as jobqueue
from .context import context, project_state, retrying

log = logging.getLogger(__name__)


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
            list_group_tasks=lambda pid: retrying(
                ctx, f"listing the tasks of project {pid}", lambda: ctx.ls.project_tasks(pid, refresh=True)
            ),
            group_by=project.group_by,
            image_key=project.config.image_key,
            config=FinetuneConfig(
                steps=s.finetune_steps, lr=s.finetune_lr, heldout_fraction=s.heldout_fraction
            ),
            promote_metric=s.promote_metric,
            max_pixels=s.max_image_pixels,
            promote_margin=s.promote_margin,
            min_corrections=s.finetune_min_corrections,
            progress=progress,
        )
    except (jobqueue.JobCanceledError, jobqueue.JobTimeoutError, TransientJobError):
        raise
    except (BackendError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        jobqueue.give_up(reason)
        raise PermanentJobError(reason) from None
    log.info("project %s: fine-tune %s", project_id, result.get("status"))
    return result
