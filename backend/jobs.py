"""Job functions: small, idempotent functions of ids, run by ``backend/queue.py`` (RQ worker or in-process).

- :func:`prelabel_project` (runs where it is called, e.g. in the API): lists the project's groups and enqueues
  one :func:`prelabel_group` per group, with the id ``prelabel-p<project>-<12 hex of the group>-<model
  version>``. Asking twice enqueues nothing new: a job with that id that is queued, running or finished is
  left alone.
- :func:`prelabel_group` (runs on a worker): computes the group with the process's pipeline (loaded once)
  and pushes one prediction per task with ``predictions.create``, skipping tasks that already have a
  prediction of this model version. The check is repeated per task just before its push, so a re-run after a
  crash (or a twin run) never duplicates predictions. Groups larger than ``COSOD_MAX_GROUP_IMAGES`` are
  computed in chunks (each with ``COSOD_MAX_REFS`` references). Progress (images done / total) is in the
  job's meta; the result holds counts, seconds and the seconds spent in the pipeline.

Faults: every Label Studio call is tried ``COSOD_JOB_ATTEMPTS`` times with exponential backoff
(``COSOD_JOB_BACKOFF`` s, doubling) while Label Studio is unreachable or answers 5xx; after that the job fails
and the queue re-runs it up to ``COSOD_JOB_RETRIES`` times. A permanent fault (unknown project, a label config
without a brush/polygon control, a worker whose model version differs from the job's) fails at once with a
reason naming it. Each group is its own job, so a failed group never undoes the finished ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

from . import queue as jobqueue
from .errors import BackendError, UnknownProjectError
from .grouping import GroupKey, TaskRef, choose_subset, effective_rule, group_key, members
from .labelstudio import LabelStudioClient, LabelStudioUnavailableError
from .loader import PipelineLoader
from .metrics import default_metrics
from .model import CoSODModel
from .projects import Project
from .settings import Settings, parse_group_by

log = logging.getLogger(__name__)
T = TypeVar("T")
PUSH_THREADS = 4  # concurrent Label Studio requests of one job (prediction checks and pushes)


class TransientJobError(RuntimeError):
    """Label Studio stayed unreachable through all attempts; the queue may run the job again."""


class PermanentJobError(RuntimeError):
    """A fault that another attempt cannot fix; the message says what to change."""


@dataclass
class JobContext:
    """What job functions use: the settings, the pipeline loader, the Label Studio client and the model."""

    settings: Settings
    loader: PipelineLoader
    ls: LabelStudioClient
    model: CoSODModel

    @classmethod
    def from_settings(cls, settings: Settings, pipeline_factory: Any = None) -> JobContext:
        loader = PipelineLoader(settings, pipeline_factory)
        ls = LabelStudioClient(settings)
        return cls(settings, loader, ls, CoSODModel(settings, loader, ls, default_metrics()))


_ctx: tuple[int, JobContext] | None = None
_ctx_lock = threading.Lock()


def install_context(ctx: JobContext) -> None:
    """Make ``ctx`` the process's job context (the app and the worker do this once at start)."""
    global _ctx
    with _ctx_lock:
        _ctx = (os.getpid(), ctx)


def context() -> JobContext:
    """The process's job context; built from the environment on first use when none was installed."""
    global _ctx
    with _ctx_lock:
        if _ctx is None or _ctx[0] != os.getpid():
            _ctx = (os.getpid(), JobContext.from_settings(Settings.from_env()))
        return _ctx[1]


def _retrying(ctx: JobContext, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    """``fn()``, tried ``attempts`` (default COSOD_JOB_ATTEMPTS) times while Label Studio is unavailable."""
    attempts = attempts or ctx.settings.job_attempts
    delay = ctx.settings.job_backoff
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except LabelStudioUnavailableError as exc:
            last = exc
            if i + 1 < attempts:
                wait = delay * 2**i
                log.warning("%s: %s; attempt %d of %d, next in %.1f s", what, exc, i + 1, attempts, wait)
                jobqueue.set_meta(last_error=str(exc))
                time.sleep(wait)
    raise TransientJobError(f"{what}: {last} (gave up after {attempts} attempts)")


def _project(ctx: JobContext, project_id: int, attempts: int | None = None) -> Project:
    """The project's state (label config, grouping, model) from MODEL_DIR, else from Label Studio."""
    try:
        return ctx.model.project(project_id)
    except UnknownProjectError:
        pass
    config = _retrying(
        ctx, f"reading project {project_id}", lambda: ctx.ls.label_config(project_id), attempts
    )
    return ctx.model.project(project_id, config)


def group_job_id(project_id: int, key: GroupKey, model_version: str) -> str:
    """``prelabel-p<project>-<12 hex of the group's rule and value>-<model version>``."""
    digest = hashlib.sha256(f"{key.rule}\x00{key.value}".encode()).hexdigest()[:12]
    return f"prelabel-p{project_id}-{digest}-{model_version}"


def enqueue_prelabel(
    project_id: int, group_by: str | None = None, groups: Sequence[str | None] | None = None
) -> list[jobqueue.Enqueued]:
    """Enqueue one :func:`prelabel_group` per group of the project (or per listed group value; ``None``
    names the group of tasks without the field). Returns each job id and whether it was created now."""
    if not isinstance(project_id, int) or isinstance(project_id, bool) or project_id < 1:
        raise ValueError(f"project must be a positive integer id, got {project_id!r}")
    if groups is not None and (
        isinstance(groups, str) or not all(g is None or isinstance(g, str) for g in groups)
    ):
        raise ValueError(f"groups must be a list of group names (strings or null), got {groups!r}")
    ctx = context()
    project = _project(ctx, project_id, attempts=1)  # an HTTP request is waiting: fail fast
    rule = effective_rule(parse_group_by(group_by) if group_by is not None else project.group_by)
    ctx.loader.require(timeout=60.0, model=project.model)
    version = ctx.model.serving(project)[1]
    tasks = _retrying(
        ctx,
        f"listing the tasks of project {project_id}",
        lambda: ctx.ls.project_tasks(project_id, refresh=True, sdk_retries=0),
        attempts=1,
    )
    keys = sorted({group_key(t.data, rule) for t in tasks}, key=lambda k: (k.value is None, k.value or ""))
    if groups is not None:
        known = {k.value for k in keys}
        unknown = [g for g in groups if g not in known]
        if unknown:
            shown = sorted(str(v) for v in known)[:20]
            raise ValueError(f"project {project_id} has no group {unknown!r} under {rule!r}; groups: {shown}")
        keys = [k for k in keys if k.value in set(groups)]
    q = jobqueue.get_queue(ctx.settings)
    s = ctx.settings
    out = []
    for key in keys:
        n = sum(1 for t in tasks if group_key(t.data, rule) == key)
        out.append(
            q.enqueue(
                prelabel_group,
                project_id,
                key,
                version,
                job_id=group_job_id(project_id, key, version),
                timeout=s.job_timeout,
                result_ttl=s.job_result_ttl,
                failure_ttl=s.job_failure_ttl,
                retries=s.job_retries,
                meta={
                    "project": project_id,
                    "group": str(key),
                    "model_version": version,
                    "progress": {"done": 0, "total": n},
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


def prelabel_group(project_id: int, key: GroupKey, model_version: str) -> dict[str, Any]:
    """Pre-annotate one group; returns counts and the tasks that got no prediction, with reasons."""
    try:
        return _prelabel_group(context(), project_id, key, model_version)
    except (jobqueue.JobCanceledError, jobqueue.JobTimeoutError):
        raise
    except TransientJobError as exc:
        jobqueue.set_meta(error=str(exc))
        raise
    except (PermanentJobError, BackendError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        jobqueue.give_up(reason)
        raise PermanentJobError(reason) from None


def _prelabel_group(ctx: JobContext, project_id: int, key: GroupKey, model_version: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    project = _project(ctx, project_id)
    ctx.loader.require(timeout=600.0, model=project.model)
    pipeline, version = ctx.model.serving(project)
    if version != model_version:
        raise PermanentJobError(
            f"this worker's model version is {version}, the job's is {model_version}: the API and the "
            "workers must share COSOD_MODEL, COSOD_BACKBONE, the weights, the checkpoints and MODEL_DIR "
            "(or a newer version was promoted since; ask again)"
        )
    ls, s = ctx.ls, ctx.settings
    tasks = _retrying(
        ctx,
        f"listing the tasks of project {project_id}",
        lambda: ls.project_tasks(project_id, refresh=True, sdk_retries=0),
    )
    group = members(tasks, key)
    total = len(group)

    def has(t: TaskRef) -> bool:
        return _retrying(
            ctx,
            f"listing the predictions of task {t.id}",
            lambda: ls.task_has_prediction(t.id, model_version),
        )

    def push(t: TaskRef, out: Any) -> str | None:
        """Push one task's prediction unless it has one of this version by now; None, or the reason."""
        if has(t):  # re-checked right before pushing: another run may have pushed meanwhile
            return "skipped"
        if out is None or (out.error is not None and out.kind != "image_unreadable"):
            return out.error if out is not None else "no outcome"
        result = [] if out.error is not None else ctx.model.regions(project.config, t.id, out)
        score = 0.0 if out.error is not None else round(out.score, 4)
        _retrying(
            ctx,
            f"pushing the prediction of task {t.id}",
            lambda: ls.create_prediction(t.id, result, score, model_version),
        )
        return None

    with ThreadPoolExecutor(max_workers=PUSH_THREADS) as pool:
        have = {t.id for t, found in zip(group, pool.map(has, group), strict=True) if found}
        todo = [t for t in group if t.id not in have]
        done = total - len(todo)
        jobqueue.report_progress(done, total)
        pushed, skipped, failed = 0, len(have), []
        chunk = max(1, s.max_group_images - s.max_refs) if total > s.max_group_images else max(1, total)
        by_id = {t.id: t for t in group}
        t_pipe = 0.0
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            subset = choose_subset(list(by_id), [t.id for t in part], k=s.max_refs, limit=s.max_group_images)
            timed = _Timed(pipeline)
            outcomes = _compute(ctx, [by_id[i] for i in subset], project, timed)
            t_pipe += timed.seconds
            futures = {pool.submit(push, t, outcomes.get(t.id)): t for t in part}
            for fut in as_completed(futures):
                reason = fut.result()
                if reason is None:
                    pushed += 1
                elif reason == "skipped":
                    skipped += 1
                else:
                    failed.append({"task": futures[fut].id, "error": reason})
                done += 1
                jobqueue.report_progress(done, total)
    seconds = time.perf_counter() - t_start
    jobqueue.set_meta(seconds=round(seconds, 3), pipeline_seconds=round(t_pipe, 3))
    log.info(
        "project %s group %s: %d tasks, %d pushed, %d failed, %.2f s (pipeline %.2f s)",
        project_id,
        key,
        total,
        pushed,
        len(failed),
        seconds,
        t_pipe,
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
    }


def _compute(ctx: JobContext, tasks: list[TaskRef], project: Project, pipeline: Any) -> dict[int, Any]:
    """Compute a chunk; when images could not be fetched because Label Studio is down, retry the chunk."""

    def attempt() -> dict[int, Any]:
        outcomes = ctx.model.compute(tasks, project.config.image_key, pipeline)
        if any(o.kind == "image_fetch" for o in outcomes.values()):
            ctx.ls.ping()  # LabelStudioUnavailableError (retried) when Label Studio is the cause
        return outcomes

    return _retrying(ctx, f"computing {len(tasks)} images of project {project.id}", attempt)


class _Timed:
    """The pipeline with the seconds spent in ``predict_group`` added up (the job reports the share of its
    time spent outside the pipeline: queue, Label Studio I/O, RLE)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def predict_group(self, images: list[Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner.predict_group(images)
        finally:
            self.seconds += time.perf_counter() - t0


# -- learning from corrections -------------------------------------------------------------------------


def finetune_job_id(project_id: int) -> str:
    return f"finetune-p{project_id}"


def enqueue_finetune(settings: Settings, project_id: int) -> str:
    """Enqueue the project's fine-tune unless one is already queued or running (one id per project, not
    kept once finished, so the next batch of corrections can start the next one). Returns the job id."""
    q = jobqueue.get_queue(settings)
    enq = q.enqueue(
        finetune,
        project_id,
        job_id=finetune_job_id(project_id),
        timeout=settings.finetune_timeout,
        result_ttl=settings.job_result_ttl,
        failure_ttl=settings.job_failure_ttl,
        retries=0,
        meta={"project": project_id, "kind": "finetune"},
        description=f"fine-tune project {project_id} on its corrections",
        keep_finished=False,
    )
    log.info(
        "project %s: fine-tune %s (%s)", project_id, enq.job_id, "new" if enq.created else "already queued"
    )
    return enq.job_id


def finetune(project_id: int) -> dict[str, Any]:
    """Fine-tune the project's active version on its corrections, score it against the active one on the
    held-out corrections, and promote it only if it is better (``backend.registry.run_finetune``)."""
    from cosod.finetune import FinetuneConfig

    from .registry import run_finetune

    ctx = context()
    s = ctx.settings
    project = _project(ctx, project_id)
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
            read_image=lambda url, task_id: _retrying(
                ctx, f"reading the image of task {task_id}", lambda: ctx.ls.read_image(url, task_id)
            ),
            list_group_tasks=lambda pid: _retrying(
                ctx, f"listing the tasks of project {pid}", lambda: ctx.ls.project_tasks(pid, refresh=True)
            ),
            group_by=project.group_by,
            image_key=project.config.image_key,
            config=FinetuneConfig(
                steps=s.finetune_steps, lr=s.finetune_lr, heldout_fraction=s.heldout_fraction
            ),
            promote_metric=s.promote_metric,
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
