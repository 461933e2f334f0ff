"""The pre-annotation job of one group: a small, idempotent function of ids, run by the queue
(:mod:`backend.jobs.queue`); :mod:`backend.jobs.enqueue` queues one per group.

- :func:`prelabel_group` (runs on a worker): gets the group's tasks (the ids listed at enqueue time) with
  the model versions of their predictions in one Data Manager request per 200 tasks, computes the tasks
  without a prediction of this version with the process's pipeline (loaded once), and stores their
  predictions with one ``projects.import_predictions`` request per chunk. Right before each import it asks
  Label Studio again which of the chunk's tasks have a prediction of this version by now, so a re-run after a
  crash (or a twin run) never duplicates predictions; Label Studio stores an import all or none. Groups
  larger than ``COSOD_MAX_GROUP_IMAGES`` are computed in chunks (each with ``COSOD_MAX_REFS`` references).
  Progress (images done / total) is in the job's meta; the result holds counts, seconds, and seconds per
  phase (``list``, ``check``, ``images``, ``pipeline``, ``encode``, ``push``, ``other``).

  Per group this is a fixed handful of Label Studio requests plus one image download per task, instead of
  three requests per task (check, re-check, ``predictions.create``): the work outside the pipeline no
  longer grows with Label Studio's per-request cost times the group size.

Faults: see :mod:`backend.jobs.context` (retries with backoff; transient and permanent faults).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

from ..errors import (
    BackendError,
    LabelStudioError,
    PermanentJobError,
    TransientJobError,
)
from ..grouping import GroupKey, TaskRef, choose_subset, members
from ..labelstudio.client import TaskState
from ..prediction.projects import Project
from ..settings import Settings
from . import queue as jobqueue
from .context import JobContext, context, project_state, retrying

log = logging.getLogger(__name__)
PUSH_THREADS = 4  # concurrent Label Studio requests of one job (prediction checks)
AHEAD_CLAIM_TTL = 600  # s: how long a worker's claim to read a queued job's images ahead lasts


def prelabel_group(
    project_id: int, key: GroupKey, model_version: str, task_ids: Sequence[int] | None = None
) -> dict[str, Any]:
    """Pre-annotate one group (``task_ids``: its members when it was enqueued; None lists the project
    again); returns counts, per-phase seconds and the tasks that got no prediction, with reasons."""
    try:
        return _prelabel_group(context(), project_id, key, model_version, task_ids)
    except (jobqueue.JobCanceledError, jobqueue.JobTimeoutError):
        raise
    except TransientJobError as exc:
        jobqueue.set_meta(error=str(exc))
        raise
    except (PermanentJobError, BackendError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        jobqueue.give_up(reason)
        raise PermanentJobError(reason) from None


class _Clock:
    """Seconds per phase of a job (``with clock("push"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


def _prelabel_group(
    ctx: JobContext, project_id: int, key: GroupKey, model_version: str, task_ids: Sequence[int] | None
) -> dict[str, Any]:
    t_start = time.perf_counter()
    clock = _Clock()
    hits_before = ctx.ls.ahead.hits
    project = project_state(ctx, project_id)
    pipeline = _pipeline_of_version(ctx, project, model_version)
    s = ctx.settings
    with clock("list"):
        states = _group_states(ctx, project, key, task_ids)
    group = [st.task for st in states]
    total = len(group)
    with clock("check"):
        have = _predicted(ctx, states, model_version)
    todo = [t for t in group if t.id not in have]
    done = total - len(todo)
    jobqueue.report_progress(done, total)
    pushed, skipped = 0, len(have)
    failed: list[dict[str, Any]] = []
    by_id = {t.id: t for t in group}
    plan = _chunks(s, list(by_id), [t.id for t in todo])
    for n, (part_ids, subset) in enumerate(plan):
        part = [by_id[i] for i in part_ids]
        ahead: Callable[[], None] | None = None
        if s.read_ahead:  # while this chunk computes: the next chunk's images, or the next job's
            nxt = [by_id[i] for i in plan[n + 1][1]] if n + 1 < len(plan) else None
            ahead = partial(_read_ahead, ctx, nxt, project.config.image_key, project.id)
        timed = _Timed(pipeline, on_start=ahead)
        t0 = time.perf_counter()
        outcomes = _compute(ctx, [by_id[i] for i in subset], project, timed)
        clock.add("pipeline", timed.seconds)
        clock.add("images", time.perf_counter() - t0 - timed.seconds)
        with clock("encode"):
            ready = _encode(ctx, project, part, outcomes, failed)
        with clock("push"):
            sent, already, refused = _push(ctx, project_id, key, ready, model_version)
        pushed, skipped = pushed + len(sent), skipped + len(already)
        failed.extend(refused)
        done += len(part)
        jobqueue.report_progress(done, total)
    seconds = time.perf_counter() - t_start
    timings = {k: round(v, 3) for k, v in clock.seconds.items()}
    timings["other"] = round(max(0.0, seconds - sum(clock.seconds.values())), 3)
    t_pipe = clock.seconds.get("pipeline", 0.0)
    jobqueue.set_meta(seconds=round(seconds, 3), pipeline_seconds=round(t_pipe, 3), timings=timings)
    log.info(
        "project %s group %s: %d tasks, %d pushed, %d skipped, %d failed, %.2f s (pipeline %.2f s; %s)",
        project_id,
        key,
        total,
        pushed,
        skipped,
        len(failed),
        seconds,
        t_pipe,
        ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
    )
    return {
        "project": project_id,
        "group": str(key),
        "model_version": model_version,
        "total": total,
        "pushed": pushed,
        "skipped": skipped,
        "failed": failed,
        "seconds": round(seconds, 3),
        "pipeline_seconds": round(t_pipe, 3),
        "timings": timings,
        "images_read_ahead": ctx.ls.ahead.hits - hits_before,
    }


def _pipeline_of_version(ctx: JobContext, project: Project, model_version: str) -> Any:
    """The pipeline this worker serves the project with; a permanent fault when its version is not the
    job's (the API and this worker disagree, or a newer version was promoted since the job was queued)."""
    ctx.loader.require(timeout=600.0, model=project.model)
    pipeline, version = ctx.model.serving(project)
    if version != model_version:
        raise PermanentJobError(
            f"this worker's model version is {version}, the job's is {model_version}: the API and the "
            "workers must share COSOD_MODEL, COSOD_BACKBONE, the weights, the checkpoints and MODEL_DIR "
            "(or a newer version was promoted since; ask again)"
        )
    return pipeline


def _group_states(
    ctx: JobContext, project: Project, key: GroupKey, task_ids: Sequence[int] | None
) -> list[TaskState]:
    """The group's tasks with the model versions of their predictions (``task_ids``: the members when the
    job was queued; None lists the project again). Tasks deleted since are logged and left out."""
    ls, project_id = ctx.ls, project.id
    if task_ids is None:
        listed = retrying(
            ctx,
            f"listing the tasks of project {project_id}",
            lambda: ls.project_tasks(project_id, refresh=True, sdk_retries=0),
        )
        listed = ctx.model.similar.tag(project, listed)  # a no-op unless the rule is `similar`
        task_ids = [t.id for t in members(listed, key, project.config.image_key)]
    wanted = list(task_ids)
    states = retrying(
        ctx,
        f"listing the {len(wanted)} tasks of group {key} in project {project_id}",
        lambda: ls.tasks_with_versions(project_id, wanted),
    )
    gone = sorted(set(wanted) - {st.task.id for st in states})
    if gone:
        log.info("project %s group %s: %d tasks deleted since enqueued: %s", project_id, key, len(gone), gone)
    return states


def _encode(
    ctx: JobContext, project: Project, part: Sequence[TaskRef], outcomes: dict[int, Any], failed: list[Any]
) -> dict[int, tuple[list[dict[str, Any]], float]]:
    """Task id -> (regions, score) to push; tasks without a mask are added to ``failed``, except those whose
    image is not decodable, which get an empty result so that they are not asked again."""
    ready: dict[int, tuple[list[dict[str, Any]], float]] = {}
    for t in part:
        out = outcomes.get(t.id)
        if out is None or (out.error is not None and out.kind != "image_unreadable"):
            failed.append({"task": t.id, "error": out.error if out is not None else "no outcome"})
        elif out.error is not None:
            ready[t.id] = ([], 0.0)
        else:
            ready[t.id] = (ctx.model.regions(project.config, t.id, out), round(out.score, 4))
    return ready


def _chunks(s: Settings, group: list[int], todo: list[int]) -> list[tuple[list[int], list[int]]]:
    """How a group's ``todo`` task ids are computed: ``(the chunk's ids, the ids computed with them)``.
    A group of at most ``COSOD_MAX_GROUP_IMAGES`` is one chunk computed whole; a larger one goes in chunks
    of that size less ``COSOD_MAX_REFS``, each computed with ``COSOD_MAX_REFS`` references."""
    size = max(1, s.max_group_images - s.max_refs) if len(group) > s.max_group_images else max(1, len(group))
    parts = [todo[i : i + size] for i in range(0, len(todo), size)]
    return [(p, choose_subset(group, p, k=s.max_refs, limit=s.max_group_images)) for p in parts]


def _predicted(ctx: JobContext, states: Sequence[TaskState], model_version: str) -> set[int]:
    """Ids of the tasks that have a prediction of ``model_version``; a task whose versions Label Studio's
    list could not tell is asked on its own."""
    unknown = [st.task.id for st in states if st.has(model_version) is None]
    have = {st.task.id for st in states if st.has(model_version)}
    if unknown:

        def ask(task_id: int) -> bool:
            return retrying(
                ctx,
                f"listing the predictions of task {task_id}",
                lambda: ctx.ls.task_has_prediction(task_id, model_version),
            )

        with ThreadPoolExecutor(max_workers=PUSH_THREADS) as pool:
            have |= {i for i, found in zip(unknown, pool.map(ask, unknown), strict=True) if found}
    return have


def _push(
    ctx: JobContext,
    project_id: int,
    key: GroupKey,
    ready: dict[int, tuple[list[dict[str, Any]], float]],
    model_version: str,
) -> tuple[list[int], list[int], list[dict[str, Any]]]:
    """Store the predictions of ``ready`` (task id -> result, score): ``(sent, already there, failed)``.

    Each attempt first asks Label Studio again which of these tasks have a prediction of this version by
    now (another run, or an attempt whose answer was lost after Label Studio had stored it), then imports
    the rest in one request, which Label Studio stores all or none. When it refuses the batch (HTTP 4xx, e.g.
    a task deleted in the meantime), each task is pushed on its own so that one bad task fails alone."""
    if not ready:
        return [], [], []
    ls = ctx.ls

    def attempt() -> tuple[list[int], list[int], list[dict[str, Any]]]:
        states = ls.tasks_with_versions(project_id, list(ready))
        already = _predicted(ctx, states, model_version)
        present = {st.task.id for st in states}
        missing = [{"task": i, "error": "the task was deleted"} for i in sorted(set(ready) - present)]
        send = sorted(present - already)
        ls.import_predictions(
            project_id,
            [
                {"task": i, "result": ready[i][0], "score": ready[i][1], "model_version": model_version}
                for i in send
            ],
        )
        return send, sorted(already), missing

    what = f"pushing {len(ready)} predictions of group {key} in project {project_id}"
    try:
        return retrying(ctx, what, attempt)
    except LabelStudioError as exc:  # refused (4xx); unreachable ends in TransientJobError after retries
        log.warning("%s: %s; pushing them one by one", what, exc)
    sent, already, failed = [], [], []
    for task_id, (result, score) in sorted(ready.items()):
        try:
            if retrying(
                ctx,
                f"listing the predictions of task {task_id}",
                lambda: ls.task_has_prediction(task_id, model_version),  # noqa: B023 - called at once
            ):
                already.append(task_id)
                continue
            retrying(
                ctx,
                f"pushing the prediction of task {task_id}",
                lambda: ls.create_prediction(task_id, result, score, model_version),  # noqa: B023
            )
            sent.append(task_id)
        except LabelStudioError as exc:
            failed.append({"task": task_id, "error": str(exc)})
    return sent, already, failed


def _compute(ctx: JobContext, tasks: list[TaskRef], project: Project, pipeline: Any) -> dict[int, Any]:
    """Compute a chunk; when images could not be fetched because Label Studio is down, retry the chunk."""

    def attempt() -> dict[int, Any]:
        outcomes = ctx.model.compute(tasks, project.config.image_key, pipeline, project.id)
        if any(o.kind == "image_fetch" for o in outcomes.values()):
            ctx.ls.ping()  # LabelStudioUnavailableError (retried) when Label Studio is the cause
        return outcomes

    return retrying(ctx, f"computing {len(tasks)} images of project {project.id}", attempt)


def _fill_ahead(ctx: JobContext, tasks: Sequence[TaskRef], image_key: str, project_id: int) -> int:
    refs: list[tuple[str, int | None]] = [
        (url, t.id) for t in tasks if isinstance(url := t.data.get(image_key), str)
    ]
    return ctx.ls.read_ahead(refs, project_id=project_id)


def _read_ahead(ctx: JobContext, tasks: Sequence[TaskRef] | None, image_key: str, project_id: int) -> None:
    """Read the images of ``tasks`` into the client's read-ahead store (in a daemon thread); ``None``: those
    of the next queued group job (:func:`_read_ahead_next_job`)."""
    if tasks is None:
        _read_ahead_next_job(ctx)
        return
    threading.Thread(
        target=_fill_ahead, args=(ctx, tasks, image_key, project_id), name="cosod-ahead", daemon=True
    ).start()


def _read_ahead_next_job(ctx: JobContext) -> None:
    """Read ahead the images of the first chunk of the next queued group job that no other worker claimed
    (in a daemon thread; any failure only means nothing is read ahead)."""

    def run() -> None:
        try:
            nxt = jobqueue.get_queue(ctx.settings).claim_next(prelabel_group, ttl=AHEAD_CLAIM_TTL)
            if nxt is None or len(nxt[1]) < 4 or nxt[1][3] is None:
                return
            project_id, _, version, ids = nxt[1][:4]
            project = ctx.model.project(project_id)
            states = ctx.ls.tasks_with_versions(project_id, ids)
            todo = [st.task.id for st in states if not st.has(version)]
            plan = _chunks(ctx.settings, [st.task.id for st in states], todo)
            first = set(plan[0][1]) if plan else set()
            tasks = [st.task for st in states if st.task.id in first]
            log.debug(
                "read %d images of job %s ahead",
                _fill_ahead(ctx, tasks, project.config.image_key, project_id),
                nxt[0],
            )
        except Exception as exc:
            log.debug("reading the next job's images ahead failed: %s", exc)

    threading.Thread(target=run, name="cosod-ahead", daemon=True).start()


class _Timed:
    """The pipeline with the seconds spent in ``predict_group`` added up (the job reports the share of its
    time spent outside the pipeline: queue, Label Studio I/O, RLE). ``on_start`` is called as the pipeline
    starts (once its images are in): the job reads the next images ahead meanwhile."""

    def __init__(self, inner: Any, on_start: Callable[[], None] | None = None):
        self.inner = inner
        self.seconds = 0.0
        self.on_start = on_start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_group(self, images: list[Any]) -> Any:
        if self.on_start is not None:
            self.on_start()
            self.on_start = None
        t0 = time.perf_counter()
        try:
            return self.inner.predict_group(images)
        finally:
            self.seconds += time.perf_counter() - t0
