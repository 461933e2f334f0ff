"""Propagation of corrections within a group: one job per (project, group), queued by the webhook.

When a correction of a task arrives (``ANNOTATION_CREATED`` / ``UPDATED``, stored by
:mod:`backend.learning.corrections`), :func:`schedule_propagation` queues :func:`propagate_group` (the
webhook never computes: it answers within 1 s). The job

1. lists the group's tasks (the project's grouping rule; under ``similar`` the stored assignment), and asks
   Label Studio which of them people annotated (one Data Manager request per 200 tasks);
2. takes every stored correction of the group's tasks (:meth:`Store.load_corrections`: the latest
   annotation per task; an empty one says "no common object here"), and the live provisional masks of
   interactive prompts (:mod:`backend.learning.prompts`, queued by :mod:`backend.prediction.interactive`) of
   its tasks that have no annotation (an annotated task's prompt is deleted), and reads the group's images;
3. gets the images' backbone features through the pipeline's feature cache (no backbone pass for images
   predicted before) and runs :func:`cosod.propagate.propagate` with the corrections as exemplars;
4. for every other task that has no annotation, updates the task's prediction of the version the project
   serves **in place** (``PATCH /api/predictions/<id>``, :mod:`backend.labelstudio.predictions`), or creates
   it when the task has none, so opening the next task shows the propagated mask and a task keeps one
   prediction per version. Annotated tasks are never touched: they are left out, and asked again right
   before the push.

Right before the push the job reads the group's corrections again: when one arrived meanwhile it computes
again with it (at most :data:`MAX_ROUNDS` times), so it never writes masks older than what it could know.

**Coalescing.** The job id is ``propagate-p<project>-<12 hex of the group key>``: while it is queued, more
corrections of the group enqueue nothing (the queued job reads them all when it runs). While it runs, a
correction queues one follow-up, ``<id>-again``, which the queue also keeps to one. Finished jobs are not
kept under their id, so the next correction queues a new run. Follow a job with ``GET /jobs/<id>``.

Off per project with extra params ``{"propagate": false}``, or by default with ``COSOD_PROPAGATE=0``.
With the absence decision on (``{"absence": true}``, :mod:`backend.prediction.absence`) the served pipeline
runs it over the targets: one judged without the object gets no mask, score 0 and the config's choice.
Faults: as every job (:mod:`backend.jobs.context`): Label Studio calls are retried with backoff.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from ..errors import (
    BackendError,
    PermanentJobError,
    TransientJobError,
)
from ..grouping import GroupKey, TaskRef, members
from ..labelstudio import predictions as lspred
from ..learning.prompts import PromptStore
from ..learning.rows import Correction
from ..prediction.groupcache import Outcome
from ..prediction.projects import Project
from ..settings import Settings
from . import queue as jobqueue
from .context import JobContext, context, project_state, retrying
from .pushing import Pusher

log = logging.getLogger(__name__)
MAX_ROUNDS = 3  # computations of one job when corrections keep arriving while it computes
THREADS = 8  # concurrent image reads (the updates: backend.jobs.pushing)
STREAM = 4  # targets computed, then pushed while the next ones are computed
MAX_EXEMPLAR_IMAGES = 32  # corrected or prompted images used as exemplars: the latest ones


def propagation_job_id(project_id: int, key: GroupKey) -> str:
    h = hashlib.sha256(f"{key.rule}\x00{key.value}".encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"propagate-p{project_id}-{h}"


def schedule_propagation(settings: Settings, project_id: int, key: GroupKey, task_id: int) -> dict[str, Any]:
    """Queue the group's propagation job unless one is queued; when one is running, queue its follow-up.
    Returns what the webhook answers: ``{"propagation_job": id, "propagation_new": bool,
    "propagation_state": status}``. Raises :class:`JobQueueError` when the queue is down."""
    q = jobqueue.get_queue(settings)
    job_id = propagation_job_id(project_id, key)
    enq = _enqueue(q, settings, job_id, project_id, key, task_id)
    state = "queued"
    if not enq.created:
        info = q.fetch(job_id)
        state = info.status if info is not None else "queued"
        if state == "started":  # it may have read the corrections before this one: one run after it
            enq = _enqueue(q, settings, f"{job_id}-again", project_id, key, task_id)
            if not enq.created:
                again = q.fetch(enq.job_id)
                state = again.status if again is not None else "queued"
            else:
                state = "queued"
    return {"propagation_job": enq.job_id, "propagation_new": enq.created, "propagation_state": state}


def _enqueue(
    q: jobqueue.JobQueue, s: Settings, job_id: str, project_id: int, key: GroupKey, task_id: int
) -> jobqueue.Enqueued:
    return q.enqueue(
        propagate_group,
        project_id,
        key,
        task_id,
        job_id=job_id,
        timeout=s.job_timeout,
        result_ttl=s.job_result_ttl,
        failure_ttl=s.job_failure_ttl,
        retries=s.job_retries,
        meta={"project": project_id, "group": str(key), "kind": "propagate"},
        description=f"propagate the corrections of project {project_id} group {key}",
        keep_finished=False,
    )


def propagate_group(project_id: int, key: GroupKey, task_id: int | None = None) -> dict[str, Any]:
    """Re-predict the unannotated tasks of a group from its corrections (module doc). ``task_id``: the
    corrected task that queued the job (logged only). Returns counts, the tasks updated, created, left alone
    and failed, and seconds per phase."""
    try:
        return _propagate_group(context(), project_id, key, task_id)
    except (jobqueue.JobCanceledError, jobqueue.JobTimeoutError):
        raise
    except TransientJobError as exc:
        jobqueue.set_meta(error=str(exc))
        raise
    except (PermanentJobError, BackendError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        jobqueue.give_up(reason)
        raise PermanentJobError(reason) from None


def _propagate_group(ctx: JobContext, project_id: int, key: GroupKey, task_id: int | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    project = project_state(ctx, project_id)
    out: dict[str, Any] = {"project": project_id, "group": str(key), "task": task_id}
    if not project.propagate:
        return {**out, "status": "off", "message": "propagation is off for this project"}
    ctx.loader.require(timeout=600.0, model=project.model)
    pipeline, version = ctx.model.serving(project)
    out["model_version"] = version
    t0 = time.perf_counter()
    group = _members(ctx, project, key)
    timings["list"] = time.perf_counter() - t0
    images: dict[int, np.ndarray] = {}
    failed: list[dict[str, Any]] = []
    done: dict[str, Any] = {}
    prompts = PromptStore(ctx.settings.model_dir, ctx.settings.prompt_ttl)
    for rounds in range(1, MAX_ROUNDS + 1):
        seq = [ctx.model.store.change_seq(project_id)]  # read before the corrections: a change is seen
        corrections = _corrections(ctx, project_id, {t.id for t in group})
        provisional = prompts.load(project_id, [t.id for t in group])
        if not corrections and not provisional:
            return {**out, "status": "nothing", "message": "the group has no stored correction or prompt"}
        t0 = time.perf_counter()
        annotated = retrying(
            ctx,
            f"listing the annotations of group {key} in project {project_id}",
            lambda: lspred.annotated_tasks(ctx.ls, project_id, [t.id for t in group]),
        )
        stale = {i for i in provisional if i in corrections or annotated.get(i) is not False}
        prompts.drop(project_id, stale)  # superseded by an annotation (or the task is gone)
        exemplars: dict[int, Correction | np.ndarray] = {
            i: p.mask for i, p in provisional.items() if i not in stale
        }
        exemplars.update(corrections)
        exemplars = _latest(exemplars)
        if not exemplars:
            return {
                **out,
                "status": "nothing",
                "message": "the group's prompts were superseded by annotations",
            }
        targets = [t.id for t in group if annotated.get(t.id) is False and t.id not in exemplars]
        todo = set(targets)
        wanted = [t for t in group if t.id in exemplars or t.id in todo]
        failed = _read_images(ctx, project, [t for t in wanted if t.id not in images], images)
        timings["images"] = timings.get("images", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        signature = _signature(corrections)
        stamps = prompts.stamps(project_id, [t.id for t in group])

        def current(
            signature: dict[int, tuple[int, float]] = signature, seq: list[int] = seq, stamps: Any = stamps
        ) -> bool:
            """No correction or prompt of the group changed since this round read them (the project's change
            counter first: one small query; the group's corrections only when it moved). Asked before each
            part is computed and again right before it is sent."""
            if prompts.stamps(project_id, [t.id for t in group]) != stamps:
                return False
            now = ctx.model.store.change_seq(project_id)
            if now == seq[0]:
                return True
            if _signature(_corrections(ctx, project_id, {t.id for t in group})) != signature:
                return False
            seq[0] = now  # another group's correction
            return True

        pusher = Pusher(ctx, project, version, current)
        try:
            masks = _propagate(ctx, pipeline, exemplars, targets, images, timings, current, pusher)
        finally:
            done = pusher.close()
        timings["propagate"] = timings.get("propagate", 0.0) + time.perf_counter() - t0
        timings["push"] = timings.get("push", 0.0) + pusher.seconds
        if masks is None:
            return {
                **out,
                "status": "nothing",
                "corrections": len(corrections),
                "message": "the group's corrections and prompts have no foreground: nothing to propagate",
            }
        if not current():
            log.info("project %s group %s: corrections changed while computing; again", project_id, key)
            continue
        used = sorted(i for i in exemplars if i in corrections)
        out.update(rounds=rounds, corrections=len(used), corrected_tasks=used)
        out["prompted_tasks"] = sorted(set(exemplars) - set(corrections))
        break
    else:
        done = {}  # corrections kept coming: the follow-up job writes the masks of all of them
    seconds = time.perf_counter() - t_start
    timings = {k: round(v, 3) for k, v in timings.items()}
    jobqueue.set_meta(seconds=round(seconds, 3), timings=timings)
    log.info(
        "project %s group %s: propagated from %s corrections: %d updated, %d created, %d annotated since, "
        "%d failed, %.2f s (%s)",
        project_id,
        key,
        out.get("corrections"),
        len(done.get("updated", [])),
        len(done.get("created", [])),
        len(done.get("annotated", [])),
        len(failed) + len(done.get("failed", [])),
        seconds,
        timings,
    )
    return {
        **out,
        "status": "propagated" if done else "busy",  # busy: corrections kept coming; the follow-up runs
        "targets": len(done.get("updated", [])) + len(done.get("created", [])),
        "updated": done.get("updated", []),
        "created": done.get("created", []),
        "annotated_since": done.get("annotated", []),
        "failed": failed + done.get("failed", []),
        "seconds": round(seconds, 3),
        "timings": timings,
    }


def _members(ctx: JobContext, project: Project, key: GroupKey) -> list[TaskRef]:
    listed = retrying(
        ctx,
        f"listing the tasks of project {project.id}",
        lambda: ctx.ls.project_tasks(project.id, refresh=True, sdk_retries=0),
    )
    listed = ctx.model.similar.tag(project, listed)  # a no-op unless the rule is `similar`
    return members(listed, key, project.config.image_key)


def _corrections(ctx: JobContext, project_id: int, task_ids: set[int]) -> dict[int, Correction]:
    """Task id -> its latest stored correction, for the tasks among ``task_ids``."""
    rows = ctx.model.store.load_corrections(project_id, max_pixels=ctx.settings.max_image_pixels)[0]
    return {c.task_id: c for c in rows if c.task_id in task_ids}


def _latest(exemplars: dict[int, Correction | np.ndarray]) -> dict[int, Correction | np.ndarray]:
    """At most :data:`MAX_EXEMPLAR_IMAGES` exemplars (so a job's images, features and exemplar bank stay
    bounded however many tasks of the group are annotated): the prompts (live, so recent), then the most
    recently stored corrections."""
    if len(exemplars) <= MAX_EXEMPLAR_IMAGES:
        return exemplars

    def age(item: tuple[int, Correction | np.ndarray]) -> float:
        v = item[1]
        return float("inf") if isinstance(v, np.ndarray) else float(v.updated)

    return dict(sorted(exemplars.items(), key=age, reverse=True)[:MAX_EXEMPLAR_IMAGES])


def _signature(corrections: dict[int, Correction]) -> dict[int, tuple[int, float]]:
    return {i: (c.annotation_id, c.updated) for i, c in corrections.items()}


def _read_images(
    ctx: JobContext, project: Project, tasks: Sequence[TaskRef], into: dict[int, np.ndarray]
) -> list[dict[str, Any]]:
    """Read the tasks' images into ``into`` (in parallel); the tasks whose image could not be read."""

    def read(t: TaskRef) -> tuple[int, np.ndarray | None, str | None]:
        url = t.data.get(project.config.image_key)
        try:
            img = retrying(
                ctx,
                f"reading the image of task {t.id}",
                lambda: ctx.ls.read_image(url, t.id, project_id=project.id),
            )
            return t.id, img, None
        except (BackendError, OSError, ValueError) as exc:
            return t.id, None, str(exc)

    failed = []
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for tid, img, error in pool.map(read, tasks):
            if img is not None:
                into[tid] = img
            else:
                failed.append({"task": tid, "error": f"image not read: {error}"})
    return failed


def _mask_for(c: Correction | np.ndarray, image: np.ndarray) -> np.ndarray:
    """The correction's (or a prompt's) mask at the image's size (an empty correction of unknown size: all
    False)."""
    h, w = image.shape[:2]
    mask = c if isinstance(c, np.ndarray) else c.mask
    if mask is None:
        return np.zeros((h, w), dtype=bool)
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST), dtype=bool)


def _propagate(
    ctx: JobContext,
    pipeline: Any,
    corrections: dict[int, Correction | np.ndarray],
    targets: list[int],
    images: dict[int, np.ndarray],
    timings: dict[str, float],
    current: Callable[[], bool],
    pusher: Pusher,
) -> dict[int, Outcome] | None:
    """Task id -> propagated outcome for the ``targets`` whose image was read; None when the exemplars
    (``corrections``: stored corrections and provisional prompt masks) have no foreground.

    The targets are computed :data:`STREAM` at a time and each part goes to ``pusher`` as soon as it is
    done, while ``current()`` says no correction arrived meanwhile (else the rest is not computed: the
    round starts again). So Label Studio's updates overlap the next part's CRFs, and the first tasks of a
    group show their new mask before the last are computed. With the absence decision on, the targets of
    a part are judged together, so a part is as large as it can be (the decision compares images).
    Groups larger than ``COSOD_MAX_GROUP_IMAGES`` are encoded in parts, each with every corrected image.
    Adds the seconds of the feature cache (``encode``) and of propagate's phases (``prototype``,
    ``refine``, ``crf``, ``resize``) to ``timings``."""
    from cosod.features import image_hash
    from cosod.propagate import prepare, propagate

    corrected = [i for i in sorted(corrections) if i in images]
    todo = [i for i in targets if i in images]
    if not corrected:
        return {}
    step = max(1, ctx.settings.max_group_images - len(corrected))
    judged = getattr(pipeline, "absence", False) or getattr(
        getattr(pipeline, "config", None), "absence", False
    )
    stream = step if judged else min(step, STREAM)
    out: dict[int, Outcome] = {}
    for start in range(0, max(1, len(todo)), step):
        ids = corrected + todo[start : start + step]
        imgs = [images[i] for i in ids]
        t0 = time.perf_counter()
        feats = pipeline.encode(imgs, [image_hash(im) for im in imgs])
        timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
        exemplars = {k: _mask_for(corrections[i], images[i]) for k, i in enumerate(corrected)}
        local = list(range(len(corrected), len(ids)))
        prepared = prepare(feats, exemplars)  # once for the parts below
        for part in range(0, max(1, len(local)), stream):
            result = propagate(
                pipeline, feats, imgs, exemplars, targets=local[part : part + stream], prepared=prepared
            )
            for phase in ("prototype", "refine", "crf", "resize"):
                timings[phase] = timings.get(phase, 0.0) + result.timings.get(phase, 0.0)
            if result.prototypes is not None and result.prototypes.foreground is None:
                return None
            absent = set(result.absent)  # with the absence decision on (the served pipeline runs it)
            chunk = {
                ids[k]: Outcome(mask=result.masks[k], score=float(result.scores[k]), absent=k in absent)
                for k in result.targets
            }
            if not current():
                return out
            out.update(chunk)
            pusher.submit(chunk)
            jobqueue.report_progress(min(len(todo), start + part + stream), max(1, len(todo)))
    return out


__all__ = ["propagate_group", "propagation_job_id", "schedule_propagation"]
