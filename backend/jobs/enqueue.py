"""Turning requests into jobs: deterministic job ids (asking twice queues nothing new) and the enqueueing.

- :func:`prelabel_project` / :func:`enqueue_prelabel` (run where they are called, e.g. in the API): list the
  project's groups and enqueue one :func:`~backend.jobs.prelabel.prelabel_group` per group, with the id
  ``prelabel-p<project>-<12 hex of the group and its task ids>-<model version>``. Asking twice enqueues
  nothing new: a job with that id that is queued, running or finished is left alone. A group whose tasks
  changed since gets a new job, which skips what is predicted.
- :func:`enqueue_finetune` (defined in :mod:`backend.jobs.finetuning`, named here too): the project's
  fine-tune, unless one is queued or running; the webhook calls it through ``CoSODModel.schedule_finetune``
  (:func:`backend.jobs.finetuning.schedule_finetune`, which also says the job's state).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

from ..errors import quote
from ..grouping import GroupKey, TaskRef, effective_rule, groups_of
from ..labelstudio.protocol import parse_id
from ..settings import parse_group_by
from . import queue as jobqueue
from .context import JobContext, context, project_state, retrying
from .finetuning import enqueue_finetune, finetune_job_id
from .prelabel import prelabel_group

__all__ = ["enqueue_finetune", "enqueue_prelabel", "finetune_job_id", "group_job_id", "prelabel_project"]

log = logging.getLogger(__name__)


def group_job_id(project_id: int, key: GroupKey, model_version: str, task_ids: Iterable[int] = ()) -> str:
    """``prelabel-p<project>-<12 hex of the group's rule, value and task ids>-<model version>``: asking again
    for an unchanged group finds its job; a group with tasks added or removed since gets a new one."""
    h = hashlib.sha256(f"{key.rule}\x00{key.value}".encode("utf-8", "surrogatepass"))
    for task_id in sorted(set(task_ids)):
        h.update(f"\x00{task_id}".encode())
    return f"prelabel-p{project_id}-{h.hexdigest()[:12]}-{model_version}"


def current_tasks(
    project_id: int, group_by: str | None, arrived: float, *, group_new: bool = True
) -> tuple[JobContext, str, str, list[TaskRef], str]:
    """For a request that arrived at ``arrived`` (``time.monotonic()``): the job context, the grouping rule
    (``group_by`` or the project's), the version the project serves, the project's tasks from a listing
    that started after the request arrived, and the data key of their images. Under ``similar`` the tasks
    carry their groups, and with ``group_new`` the ones not grouped yet are grouped here, in this process
    (one backbone pass per new image, its features cached for the jobs; each chunk is stored as it is done,
    so a request cut short loses nothing). Fails fast: an HTTP request is waiting."""
    ctx = context()
    project = project_state(ctx, project_id, attempts=1)
    if group_by is not None:
        project = replace(project, group_by=parse_group_by(group_by))
    rule = effective_rule(project.group_by)
    ctx.loader.require(timeout=60.0, model=project.model)
    pipeline, version = ctx.model.serving(project)
    tasks = retrying(
        ctx,
        f"listing the tasks of project {project_id}",
        lambda: ctx.ls.project_tasks(project_id, refresh=True, since=arrived, sdk_retries=0),
        attempts=1,
    )
    if group_new:
        tasks = ctx.model.similar.resolve(project, tasks, pipeline, listed=tasks)[0]
    else:
        tasks = ctx.model.similar.tag(project, tasks)
    return ctx, rule, version, tasks, project.config.image_key


def enqueue_prelabel(
    project_id: int, group_by: str | None = None, groups: Sequence[str | None] | None = None
) -> list[jobqueue.Enqueued]:
    """Enqueue one :func:`prelabel_group` per group of the project (or per listed group value; ``None``
    names the group of tasks without the field). Returns each job id and whether it was created now."""
    arrived = time.monotonic()  # a burst of requests shares the listings that start after it arrives
    project_id = parse_id(project_id, "project")
    if groups is not None and (
        isinstance(groups, str) or not all(g is None or isinstance(g, str) for g in groups)
    ):
        raise ValueError(f"groups must be a list of group names (strings or null), got {quote(groups)}")
    ctx, rule, version, tasks, image_key = current_tasks(project_id, group_by, arrived)
    by_key = groups_of(tasks, rule, image_key)
    keys = sorted(by_key, key=lambda k: (k.value is None, k.value or ""))
    if groups is not None:
        known = {k.value for k in keys}
        unknown = [g for g in groups if g not in known]
        if unknown:
            shown = sorted(str(v) for v in known)[:20]
            raise ValueError(
                f"project {project_id} has no group {quote(unknown)} under {rule!r}; groups: {quote(shown)}"
            )
        keys = [k for k in keys if k.value in set(groups)]
    q = jobqueue.get_queue(ctx.settings)
    s = ctx.settings
    out = []
    for key in keys:
        ids = [t.id for t in by_key[key]]
        out.append(
            q.enqueue(
                prelabel_group,
                project_id,
                key,
                version,
                ids,
                job_id=group_job_id(project_id, key, version, ids),
                timeout=s.job_timeout,
                result_ttl=s.job_result_ttl,
                failure_ttl=s.job_failure_ttl,
                retries=s.job_retries,
                meta={
                    "project": project_id,
                    "group": str(key),
                    "model_version": version,
                    "progress": {"done": 0, "total": len(ids)},
                },
                description=f"pre-annotate project {project_id} group {key} with {version}",
            )
        )
    created = sum(e.created for e in out)
    log.info("project %s: %d group jobs, %d new (version %s)", project_id, len(out), created, version)
    return out


def prelabel_project(
    project_id: int, group_by: str | None = None, groups: Sequence[str | None] | None = None
) -> list[str]:
    """The job ids of the project's group jobs (enqueued when not already queued, running or finished)."""
    return [e.job_id for e in enqueue_prelabel(project_id, group_by, groups)]
