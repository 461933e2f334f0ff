"""Sending a propagation job's masks to Label Studio (:mod:`backend.jobs.propagation`): each task's prediction
of the serving version updated in place, or created where the task has none; never a task that got an
annotation meanwhile (asked right before each part is sent)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import LabelStudioError
from ..labelstudio import predictions as lspred
from ..prediction.groupcache import Outcome
from ..prediction.projects import Project
from .context import JobContext, retrying

THREADS = 8  # concurrent Label Studio requests (prediction updates)


class Pusher:
    """Pushes parts of a group's outcomes to Label Studio in the background, one part after the other
    (:func:`push`, whose requests run on :data:`THREADS` threads); :meth:`close` waits for them and
    returns what was updated, created, left alone and failed. ``current()`` is asked right before each part
    is sent: when a newer correction or prompt arrived, the part is not sent (``stale``), so a job never
    writes masks older than what a job started after it may already have written."""

    def __init__(self, ctx: JobContext, project: Project, version: str, current: Callable[[], bool]):
        self.ctx, self.project, self.version, self.current = ctx, project, version, current
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="propagate-push")
        self.futures: list[Future[dict[str, Any]]] = []
        self.seconds = 0.0
        self.started: float | None = None

    def submit(self, masks: dict[int, Outcome]) -> None:
        if self.started is None:
            self.started = time.perf_counter()
        self.futures.append(self.pool.submit(self._send, masks))

    def _send(self, masks: dict[int, Outcome]) -> dict[str, Any]:
        if not self.current():
            return {"stale": sorted(masks)}
        return push(self.ctx, self.project, self.version, masks)

    def close(self) -> dict[str, Any]:
        done: dict[str, Any] = {}
        try:
            for f in self.futures:
                part = f.result()
                for k, v in part.items():
                    done.setdefault(k, []).extend(v)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            if self.started is not None:
                self.seconds = time.perf_counter() - self.started
        return done


def push(ctx: JobContext, project: Project, version: str, masks: dict[int, Outcome]) -> dict[str, Any]:
    """Update (or create) each target's prediction of ``version``, unless the task got an annotation
    since (asked again here, with the tasks' predictions, in one request per 50 tasks); returns the task
    ids updated, created, annotated since, and the failures."""
    if not masks:
        return {"updated": [], "created": [], "annotated": [], "failed": []}
    states = retrying(
        ctx,
        f"listing {len(masks)} tasks with their predictions in project {project.id}",
        lambda: lspred.task_predictions(ctx.ls, project.id, list(masks), version),
    )
    send = sorted(i for i in masks if i in states and not states[i].annotated)
    skipped = sorted(set(masks) - set(send))

    def push(task_id: int) -> tuple[int, str, str | None]:
        out = masks[task_id]
        result = ctx.model.regions(project.config, task_id, out)
        score = round(out.score, 4)
        try:
            ids = states[task_id].predictions
            if ids is None:
                ids = retrying(
                    ctx,
                    f"listing the predictions of task {task_id}",
                    lambda: tuple(lspred.version_predictions(ctx.ls, task_id, version)),
                )
            if ids:
                retrying(
                    ctx,
                    f"updating the prediction of task {task_id}",
                    lambda: lspred.update_prediction(ctx.ls, ids[0], task_id, result, score),
                )
                return task_id, "updated", None
            retrying(
                ctx,
                f"creating the prediction of task {task_id}",
                lambda: ctx.ls.create_prediction(task_id, result, score, version),
            )
            return task_id, "created", None
        except LabelStudioError as exc:
            return task_id, "failed", str(exc)

    done: dict[str, Any] = {"updated": [], "created": [], "annotated": skipped, "failed": []}
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for tid, what, error in pool.map(push, send):
            if what == "failed":
                done["failed"].append({"task": tid, "error": error})
            else:
                done[what].append(tid)
    return done
