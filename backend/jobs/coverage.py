"""Which groups of a project still lack a prediction of the version it serves, and what their jobs say.

Job records live in Redis; a Redis that restarts without persistence (or loses a key) forgets them, and
``GET /jobs?project=`` then lists nothing although tasks have no prediction. The truth is in Label Studio:
:func:`project_coverage` lists the project's tasks with the model versions of their predictions and reports,
per group, how many tasks have a prediction of the serving version and the group's job as the queue knows
it (``"missing"`` when the queue has no record of it). ``POST /jobs/prelabel`` for the same project then
completes exactly the groups with ``missing > 0``: a group job skips what is predicted, and a job id the
queue forgot is enqueued again.
"""

from __future__ import annotations

import time
from typing import Any

from ..grouping import groups_of
from . import queue as jobqueue
from .enqueue import current_tasks, group_job_id


def project_coverage(project_id: int, group_by: str | None = None) -> dict[str, Any]:
    """``{"project", "model_version", "tasks", "predicted", "missing", "groups": [{"group", "tasks",
    "predicted", "missing", "job", "job_status"}]}`` for the project's serving version. A task whose
    prediction versions Label Studio cut short is asked about on its own."""
    ctx, rule, version, tasks, image_key = current_tasks(
        project_id, group_by, time.monotonic(), group_new=False
    )
    states = {st.task.id: st for st in ctx.ls.tasks_with_versions(project_id, [t.id for t in tasks])}

    def predicted(task_id: int) -> bool:
        st = states.get(task_id)
        if st is None:
            return False
        has = st.has(version)
        return bool(ctx.ls.task_has_prediction(task_id, version)) if has is None else has

    q = jobqueue.get_queue(ctx.settings)
    by_key = groups_of(tasks, rule, image_key)
    keys = sorted(by_key, key=lambda k: (k.value is None, k.value or ""))
    groups: list[dict[str, Any]] = []
    for key in keys:
        ids = [t.id for t in by_key[key]]
        done = sum(predicted(i) for i in ids)
        job_id = group_job_id(project_id, key, version, ids)
        info = q.fetch(job_id)
        groups.append(
            {
                "group": key.value,
                "tasks": len(ids),
                "predicted": done,
                "missing": len(ids) - done,
                "job": job_id,
                "job_status": info.status if info is not None else "missing",
            }
        )
    total = sum(g["tasks"] for g in groups)
    done_total = sum(g["predicted"] for g in groups)
    return {
        "project": project_id,
        "model_version": version,
        "tasks": total,
        "predicted": done_total,
        "missing": total - done_total,
        "groups": groups,
    }
