"""CoSODModel: ``setup``, ``predict(tasks, context)`` and ``fit(event, data)`` per Label Studio project.

**model_version.** One per project, the same in ``/setup`` and in every prediction:
``<model name>-p<project id>-<8 hex>``, the hex being the start of sha256 over the model name, the project id
and ``pipeline.version_id`` (which changes with the config, the backbone weights or the stage-1 weights).
Example: ``scosparc-p12-3fa4c2d1``. It is a pure function of those inputs, so every worker and every restart
agrees, and Label Studio's dedup (§1.3 of the protocol doc) never sees two versions for one model.

**Groups.** A task is predicted together with its whole group (see :mod:`backend.grouping`): the other
members come from Label Studio (SDK task list, cached), their images are fetched, and
``Pipeline.predict_group`` runs on at most ``COSOD_MAX_GROUP_IMAGES`` images (beyond that: the asked tasks
plus K evenly spread references). Results are cached per (model version, group content digest)
(:mod:`.groupcache`), so the next task of the group answers at once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import (
    BackendError,
    BadRequestError,
    JobQueueError,
    TransientJobError,
    UnknownProjectError,
    quote,
)
from ..grouping import GroupKey, TaskRef, choose_subset, group_digest, group_key, members
from ..labelstudio.client import LabelStudioClient
from ..labelstudio.labelconfig import LabelConfig
from ..labelstudio.protocol import ANNOTATION_EVENTS, LEARNING_EVENTS, changes_membership, parse_id
from ..labelstudio.webhooks import WebhookAuthorizer, basic_authorization
from ..learning.corrections import handle_event
from ..learning.store import Store
from ..learning.versions import Registry
from ..metrics import Metrics
from ..settings import Settings
from . import absence
from .compute import compute_outcomes
from .groupcache import GroupCache, Outcome
from .pipelines import PipelineLoader
from .projects import Project, ProjectRegistry
from .results import result_regions
from .similar import SimilarGrouper

log = logging.getLogger(__name__)

NOT_GROUPED = (
    "not computed yet: grouping by similarity takes at most COSOD_MAX_PREDICT_TASKS={cap} new images per "
    "request and this task's turn has not come (ask again, or pre-annotate with POST /jobs/prelabel)"
)


class CoSODModel:
    """One per process; holds per-project state, the group cache and the Label Studio client."""

    def __init__(
        self,
        settings: Settings,
        loader: PipelineLoader,
        ls: LabelStudioClient,
        metrics: Metrics,
        *,
        schedule_finetune: Callable[[int], Mapping[str, Any]] | None = None,
        schedule_propagation: Callable[[int, GroupKey, int], Mapping[str, Any]] | None = None,
    ):
        self.settings = settings
        self.schedule_finetune = schedule_finetune
        self.schedule_propagation = schedule_propagation
        self.loader = loader
        self.ls = ls
        self.metrics = metrics
        self.cache = GroupCache(settings.group_cache_size)
        self.projects = ProjectRegistry(settings)
        self.store = Store(settings.model_dir)
        self.registry = Registry(self.store)
        self.similar = SimilarGrouper(settings, ls)
        self._compute_lock = threading.Lock()
        user, password = settings.basic_auth_user, settings.basic_auth_pass
        self.webhook_auth = WebhookAuthorizer(
            ls, basic_authorization(user, password) if user and password else None
        )

    # -- projects and versions ------------------------------------------------------------------------
    def model_version(self, project_id: int, pipeline: Any) -> str:
        name = getattr(getattr(pipeline, "config", None), "model", None) or self.settings.model_name
        digest = hashlib.sha256(f"{name}|{project_id}|{pipeline.version_id}".encode()).hexdigest()[:8]
        return f"{name}-p{project_id}-{digest}"

    def project(self, project_id: int, label_config: str | None = None, extra_params: Any = None) -> Project:
        return self.projects.get(project_id, label_config, extra_params)

    def serving(self, project: Project, timeout: float = 0.0) -> tuple[Any, str]:
        """``(pipeline, model_version)`` a project predicts with: its active fine-tuned version (registry,
        read from SQLite, so every process follows a promotion) or the base model of its ``model``; with
        the absence decision on, wrapped and suffixed (:mod:`.absence`)."""
        base = self.loader.require(timeout=timeout, model=project.model)
        return absence.serve(
            project.absence, *self.registry.serving(project.id, base, self.model_version(project.id, base))
        )

    def setup(
        self, project_id: int, schema: str | None, extra_params: Any = None, access_token: str | None = None
    ) -> str:
        """Validate the config, remember it, and return the project's model_version. Never loads weights:
        it waits at most 2 s for the background load, then answers NotReadyError."""
        project = self.project(project_id, schema, extra_params if extra_params is not None else {})
        self.ls.offer_token(access_token)
        self.webhook_auth.ensure(project_id)
        return self.serving(project, timeout=2.0)[1]

    def versions(self, project_id: int | None = None) -> list[dict[str, Any]]:
        """Per known project: the serving version and every version's record (scores, parent, status)."""
        ids = self.projects.ids() if project_id is None else [project_id]
        out = []
        for i in ids:
            try:
                project = self.project(i)
            except BackendError:
                continue
            base = self.loader.ready(project.model)
            if base is None:
                continue
            base_version = self.model_version(i, base)
            active = absence.versioned(project.absence, self.registry.serving(i, base, base_version)[1])
            records = [r.as_dict() for r in self.registry.list_versions(i)]
            out.append({"project": i, "active": active, "base": base_version, "versions": records})
        return out

    # -- fit (webhook) --------------------------------------------------------------------------------
    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Store the correction an annotation event carries (SQLite, committed before returning) and, when
        the project has ``COSOD_TRAIN_EVERY`` new corrections or on START_TRAINING, enqueue its fine-tune
        (one job id per project: never two at a time; none below ``COSOD_FINETUNE_MIN_CORRECTIONS``). The
        answer says what happened: ``job``/``finetune_job`` and ``finetune_state``, or in ``message`` why no
        job was started. Cheap on purpose: the webhook has 1 s."""
        project = data.get("project") if isinstance(data, Mapping) else None
        pid = project.get("id") if isinstance(project, Mapping) else None
        task = data.get("task") if isinstance(data, Mapping) else None
        tid = task.get("id") if isinstance(task, Mapping) else None
        if changes_membership(event):
            if isinstance(pid, int):
                self.ls.forget_project(pid)  # the group membership may have changed
        info: dict[str, Any] = {"action": event, "project": pid, "task": tid}
        if event not in LEARNING_EVENTS:
            log.info("webhook %s project=%s task=%s", event, pid, tid)
            return info
        known = self._known_project(pid)
        tagged = self.similar.tag_event(known, data) if known else data
        try:
            out = handle_event(
                self.store,
                event,
                tagged,
                group_by=known.group_by if known else self.settings.group_by,
                image_key=known.config.image_key if known else None,
                train_every=self.settings.train_every,
                max_pixels=self.settings.max_image_pixels,
                min_corrections=self.settings.finetune_min_corrections,
                absence=known.config.absence if known else None,
            )
        except BackendError as exc:  # its own status (422 refused correction, 404 unknown project...)
            raise type(exc)(f"{event}: {exc}") from None
        except ValueError as exc:
            raise BadRequestError(f"{event}: {exc}") from None
        info.update(stored=out.get("stored"), pending=out.get("pending"), reason=out.get("reason"))
        info["message"] = f"no fine-tune started: {out.get('reason')}"
        if out.get("enqueue") and isinstance(pid, int) and self.schedule_finetune is not None:
            try:
                info.update(self.schedule_finetune(pid))
            except (JobQueueError, TransientJobError) as exc:
                # the correction is committed; the next event (or START_TRAINING) enqueues it again
                log.warning("project %s: fine-tune not enqueued: %s", pid, exc)
                self.metrics.errors.labels(kind="queue_down").inc()
                info["finetune_job"] = None
                info["finetune_error"] = "not enqueued: the job queue is unreachable; the next event retries"
                info["message"] = f"no fine-tune started: {info['finetune_error']}"
        if known is not None and event in ANNOTATION_EVENTS:
            info.update(self._propagation(known, tagged, out))
        log.info("webhook %s project=%s task=%s: %s", event, pid, tid, info)
        return info

    def _propagation(
        self, project: Project, payload: Mapping[str, Any], out: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Queue the propagation of a stored correction to the rest of its group
        (:mod:`backend.jobs.propagation`); says the job, or why there is none."""
        why = None
        if out.get("stored") not in ("inserted", "updated"):
            why = f"the correction is {out.get('stored')}"
        key = group_key(payload["task"]["data"], project.group_by, project.config.image_key)
        return self.queue_propagation(project, key, int(out["task"]), why=why)

    def queue_propagation(
        self,
        project: Project,
        key: GroupKey,
        task_id: int,
        *,
        why: str | None = None,
        before: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """Queue the group's propagation job (a correction or an interactive prompt of ``task_id``; ``before``
        runs first when it is queued): the job, or why there is none (``why``: the caller's reason)."""
        schedule = self.schedule_propagation
        if why is None:  # the caller's reason comes first
            if not project.propagate:
                why = "off for this project (extra params 'propagate', COSOD_PROPAGATE)"
            elif schedule is None:
                why = "this process queues no jobs"
            elif not self.ls.configured:
                why = "Label Studio is not configured (LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)"
        if why is not None or schedule is None:
            return {"propagation_job": None, "propagation": f"not propagated: {why}"}
        if before is not None:
            before()
        try:
            return dict(schedule(project.id, key, task_id))
        except (JobQueueError, TransientJobError) as exc:  # what it stored stays; the next one retries
            log.warning("project %s: propagation not queued: %s", project.id, exc)
            return {"propagation_job": None, "propagation": "not propagated: the job queue is unreachable"}

    def _known_project(self, pid: Any) -> Project | None:
        if not isinstance(pid, int):
            return None
        try:
            return self.project(pid)
        except BackendError:
            return None

    # -- predict --------------------------------------------------------------------------------------
    def predict(
        self, tasks: Sequence[Mapping[str, Any]], *, project: Project, context: Any = None
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """One item per task (``{result, score, model_version}``), and a list of per-task errors.

        A task whose image is not decodable gets ``result: []`` and its reason; a task whose image is
        refused or cannot be fetched, a task of another project than the request's, and the tasks beyond
        ``COSOD_MAX_PREDICT_TASKS`` get an item without ``result`` (Label Studio stores nothing for it and
        logs the item), so that it is predicted again once the cause is fixed.

        Memory stays bounded whatever the number of tasks: groups are computed one after the other, each
        on at most ``COSOD_MAX_GROUP_IMAGES`` images at a time, and a group's masks become regions (RLE or
        polygons) as soon as they are computed.
        """
        pipeline, version = self.serving(project)
        refs = [_task_ref(t, i) for i, t in enumerate(tasks)]
        cap = self.settings.max_predict_tasks
        outcomes: dict[int, Outcome] = {}
        if self.similar.applies(project):  # group the project's new tasks first, at most `cap` images
            mine, waiting = self.similar.resolve(
                project, [r for r, o in refs if o in (None, project.id)], pipeline, budget=cap
            )
            tagged = {t.id: t for t in mine}
            refs = [(tagged.get(r.id, r), o) for r, o in refs]
            outcomes.update({i: Outcome(error=NOT_GROUPED.format(cap=cap), kind="over_cap") for i in waiting})
        by_group: dict[GroupKey, list[TaskRef]] = {}
        taken = 0
        for ref, owner in refs:
            if owner is not None and owner != project.id:
                outcomes[ref.id] = Outcome(
                    error=f"task {ref.id} belongs to project {owner}, not to project {project.id} of "
                    "this request: not read",
                    kind="wrong_project",
                )
            elif ref.id in outcomes:
                pass
            elif taken >= cap:
                outcomes[ref.id] = Outcome(
                    error=f"not computed: the request has more than COSOD_MAX_PREDICT_TASKS={cap} tasks "
                    "(pre-annotate large sets with POST /jobs/prelabel)",
                    kind="over_cap",
                )
            else:
                taken += 1
                key = group_key(ref.data, project.group_by, project.config.image_key)
                by_group.setdefault(key, []).append(ref)
        if len(refs) > taken:
            log.warning("project %s: %d of %d tasks not computed", project.id, len(refs) - taken, len(refs))
        done: dict[int, dict[str, Any]] = {}
        for key, asked in by_group.items():
            for tid, out in self._predict_group(project, key, asked, pipeline, version):
                done[tid] = self._item(project, tid, out, version)
        for tid, out in outcomes.items():
            done[tid] = self._item(project, tid, out, version)
        items = [done[ref.id] for ref, _ in refs]
        errors = [
            {"task": ref.id, "kind": i["kind"], "error": i["error"]}
            for (ref, _), i in zip(refs, items, strict=True)
            if "error" in i
        ]
        for item in items:
            item.pop("kind", None)
        self.metrics.predicted_tasks.inc(len(items))
        return items, errors

    def _item(self, project: Project, task_id: int, out: Outcome, version: str) -> dict[str, Any]:
        """The item Label Studio stores for a task (with ``kind`` and ``error`` when there is no mask)."""
        if out.error is not None:
            self.metrics.errors.labels(kind=out.kind or "unknown").inc()
            if out.kind == "image_unreadable":
                return {
                    "result": [],
                    "score": 0.0,
                    "model_version": version,
                    "error": out.error,
                    "kind": out.kind,
                }
            return {"model_version": version, "error": out.error, "kind": out.kind}
        return {
            "result": result_regions(project.config, task_id, out),
            "score": round(out.score, 4),
            "model_version": version,
        }

    # -- building blocks shared with the batch jobs (backend/jobs/) -----------------------------------
    def compute(
        self, tasks: list[TaskRef], image_key: str, pipeline: Any, project_id: int
    ) -> dict[int, Outcome]:
        """Fetch the images of ``tasks`` (of project ``project_id``: a cloud image is read only for a task
        Label Studio lists there) and run one ``predict_group`` on them: task id -> :class:`Outcome`."""
        return self._compute(tasks, image_key, pipeline, project_id)

    def regions(self, config: LabelConfig, task_id: int, out: Outcome) -> list[dict[str, Any]]:
        """The ``result`` list Label Studio stores for a task's mask (empty when the mask is empty)."""
        return result_regions(config, task_id, out)

    def _members(
        self, project: Project, key: GroupKey, asked: list[TaskRef]
    ) -> tuple[list[TaskRef], set[int]]:
        """The group's tasks: Label Studio's task list (cached) merged with the tasks of the request; and the
        asked task ids Label Studio does not list in the project (never read: their images could be another
        project's). Without Label Studio, or while it cannot be reached, the group is the request's tasks."""
        listed: list[TaskRef] | None = None
        if self.ls.configured:
            try:
                listed = self.ls.project_tasks(project.id)
                known = {t.id for t in listed}
                if any(t.id not in known for t in asked):
                    listed = self.ls.project_tasks(project.id, refresh=True)
            except UnknownProjectError:
                raise
            except BackendError as exc:
                log.warning("project %s: using only the request's tasks as the group (%s)", project.id, exc)
                self.metrics.errors.labels(kind="label_studio").inc()
        else:
            log.debug("Label Studio is not configured: the group is the request's tasks")
        by_id = {t.id: t for t in self.similar.tag(project, listed or [])}  # the asked ones: tagged already
        outsiders = {t.id for t in asked if t.id not in by_id} if listed is not None else set()
        by_id.update({t.id: t for t in asked if t.id not in outsiders})
        return members(by_id.values(), key, project.config.image_key), outsiders

    def _predict_group(
        self, project: Project, key: GroupKey, asked: list[TaskRef], pipeline: Any, version: str
    ) -> Iterator[tuple[int, Outcome]]:
        """``(task id, outcome)`` for each asked task, computed in parts of at most ``COSOD_MAX_GROUP_IMAGES``
        images (the asked tasks of a part plus the group's references), each part cached as it is done."""
        group, outsiders = self._members(project, key, asked)
        for tid in outsiders:
            yield (
                tid,
                Outcome(
                    error=f"task {tid} is not a task of project {project.id} in Label Studio: not read",
                    kind="wrong_project",
                ),
            )
        cache_key = (version, group_digest(key, group, project.config.image_key))
        by_id = {t.id: t for t in group}
        wanted = list(dict.fromkeys(t.id for t in asked if t.id not in outsiders))
        step = max(1, self.settings.max_group_images - self.settings.max_refs)
        computed_any = False
        for start in range(0, len(wanted), step):
            part = wanted[start : start + step]
            found = self.cache.get(cache_key, part)
            if len(found) < len(part):
                with self._compute_lock:  # one computation at a time; a waiting twin finds it cached
                    found = self.cache.get(cache_key, part)
                    missing = [i for i in part if i not in found]
                    if missing:
                        computed_any = True
                        subset = choose_subset(
                            list(by_id),
                            missing,
                            k=self.settings.max_refs,
                            limit=self.settings.max_group_images,
                        )
                        computed = self._compute(
                            [by_id[i] for i in subset], project.config.image_key, pipeline, project.id
                        )
                        log.info(
                            "project %s group %s: %d members, %d computed, version %s",
                            project.id,
                            quote(key.value),
                            len(group),
                            len(subset),
                            version,
                        )
                        self.cache.put(
                            cache_key, {i: o for i, o in computed.items() if o.kind != "image_fetch"}
                        )
                        found.update({i: computed[i] for i in missing})
            yield from ((i, found[i]) for i in part)
        if computed_any:
            self.metrics.group_cache_misses.inc()
        else:
            self.metrics.group_cache_hits.inc()

    def _compute(
        self, tasks: list[TaskRef], image_key: str, pipeline: Any, project_id: int
    ) -> dict[int, Outcome]:
        return compute_outcomes(self.ls, self.metrics, tasks, image_key, pipeline, project_id)


def _task_ref(task: Any, index: int) -> tuple[TaskRef, int | None]:
    """A task of a /predict request and the project it says it belongs to (None when it does not say)."""
    if not isinstance(task, Mapping):
        raise BadRequestError(f"tasks[{index}] must be an object, got {type(task).__name__}")
    tid, data = parse_id(task.get("id"), f"tasks[{index}] 'id'"), task.get("data")
    if not isinstance(data, Mapping):
        raise BadRequestError(f"tasks[{index}] (id {tid}) needs a 'data' object, got {type(data).__name__}")
    owner = task.get("project")
    return TaskRef(tid, dict(data)), None if owner is None else parse_id(owner, f"tasks[{index}] 'project'")
