"""Job functions: small, idempotent functions of ids, run by ``backend/queue.py`` (RQ worker or in-process).

- :func:`prelabel_project` (runs where it is called, e.g. in the API): lists the project's groups and enqueues
  one :func:`prelabel_group` per group, with the id ``prelabel-p<project>-<12 hex of the group and its task
  ids>-<model version>``. Asking twice enqueues nothing new: a job with that id that is queued, running or
  finished is left alone. A group whose tasks changed since gets a new job, which skips what is predicted.
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from . import queue as jobqueue
from .errors import BackendError, LabelStudioError, UnknownProjectError
from .grouping import GroupKey, TaskRef, choose_subset, effective_rule, group_key, members
from .labelstudio import LabelStudioClient, LabelStudioUnavailableError, TaskState
from .loader import PipelineLoader
from .metrics import Metrics
from .model import CoSODModel
from .projects import Project
from .settings import Settings, parse_group_by

log = logging.getLogger(__name__)
T = TypeVar("T")
PUSH_THREADS = 4  # concurrent Label Studio requests of one job (prediction checks)
AHEAD_CLAIM_TTL = 600  # s: how long a worker's claim to read a queued job's images ahead lasts


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
        return cls(settings, loader, ls, CoSODModel(settings, loader, ls, Metrics()))


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


def group_job_id(project_id: int, key: GroupKey, model_version: str, task_ids: Iterable[int] = ()) -> str:
    """``prelabel-p<project>-<12 hex of the group's rule, value and task ids>-<model version>``: asking again
    for an unchanged group finds its job; a group with tasks added or removed since gets a new one."""
    h = hashlib.sha256(f"{key.rule}\x00{key.value}".encode())
    for task_id in sorted(set(task_ids)):
        h.update(f"\x00{task_id}".encode())
    return f"prelabel-p{project_id}-{h.hexdigest()[:12]}-{model_version}"


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
        ids = [t.id for t in members(tasks, key)]
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
    with clock("list"):
        if task_ids is None:
            listed = _retrying(
                ctx,
                f"listing the tasks of project {project_id}",
                lambda: ls.project_tasks(project_id, refresh=True, sdk_retries=0),
            )
            task_ids = [t.id for t in members(listed, key)]
        wanted = list(task_ids)
        states = _retrying(
            ctx,
            f"listing the {len(wanted)} tasks of group {key} in project {project_id}",
            lambda: ls.tasks_with_versions(project_id, wanted),
        )
    gone = sorted(set(wanted) - {st.task.id for st in states})
    if gone:
        log.info("project %s group %s: %d tasks deleted since enqueued: %s", project_id, key, len(gone), gone)
    group = [st.task for st in states]
    total = len(group)
    with clock("check"):
        have = _predicted(ctx, states, model_version)
    todo = [t for t in group if t.id not in have]
    done = total - len(todo)
    jobqueue.report_progress(done, total)
    pushed, skipped, failed = 0, len(have), []
    by_id = {t.id: t for t in group}
    plan = _chunks(s, list(by_id), [t.id for t in todo])
    for n, (part_ids, subset) in enumerate(plan):
        part = [by_id[i] for i in part_ids]
        ahead: Callable[[], None] | None = None
        if s.read_ahead and n + 1 < len(plan):
            ahead = partial(_read_ahead, ctx, [by_id[i] for i in plan[n + 1][1]], project.config.image_key)
        elif s.read_ahead:
            ahead = partial(_read_ahead_next_job, ctx)
        timed = _Timed(pipeline, on_start=ahead)
        t0 = time.perf_counter()
        outcomes = _compute(ctx, [by_id[i] for i in subset], project, timed)
        clock.add("pipeline", timed.seconds)
        clock.add("images", time.perf_counter() - t0 - timed.seconds)
        with clock("encode"):
            ready: dict[int, tuple[list[dict[str, Any]], float]] = {}
            for t in part:
                out = outcomes.get(t.id)
                if out is None or (out.error is not None and out.kind != "image_unreadable"):
                    failed.append({"task": t.id, "error": out.error if out is not None else "no outcome"})
                elif out.error is not None:  # not decodable: an empty result, so it is not asked again
                    ready[t.id] = ([], 0.0)
                else:
                    ready[t.id] = (ctx.model.regions(project.config, t.id, out), round(out.score, 4))
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
            return _retrying(
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
        return _retrying(ctx, what, attempt)
    except LabelStudioError as exc:  # refused (4xx); unreachable ends in TransientJobError after retries
        log.warning("%s: %s; pushing them one by one", what, exc)
    sent, already, failed = [], [], []
    for task_id, (result, score) in sorted(ready.items()):
        try:
            if _retrying(
                ctx,
                f"listing the predictions of task {task_id}",
                lambda: ls.task_has_prediction(task_id, model_version),  # noqa: B023 - called at once
            ):
                already.append(task_id)
                continue
            _retrying(
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
        outcomes = ctx.model.compute(tasks, project.config.image_key, pipeline)
        if any(o.kind == "image_fetch" for o in outcomes.values()):
            ctx.ls.ping()  # LabelStudioUnavailableError (retried) when Label Studio is the cause
        return outcomes

    return _retrying(ctx, f"computing {len(tasks)} images of project {project.id}", attempt)


def _fill_ahead(ctx: JobContext, tasks: Sequence[TaskRef], image_key: str) -> int:
    refs = [(t.data.get(image_key), t.id) for t in tasks]
    return ctx.ls.ahead.fill(refs, ctx.ls.read_bytes)


def _read_ahead(ctx: JobContext, tasks: Sequence[TaskRef], image_key: str) -> None:
    """Read the images of ``tasks`` into the client's read-ahead store (in a daemon thread)."""
    threading.Thread(
        target=_fill_ahead, args=(ctx, tasks, image_key), name="cosod-ahead", daemon=True
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
                "read %d images of job %s ahead", _fill_ahead(ctx, tasks, project.config.image_key), nxt[0]
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
