"""Assigning tasks to ``similar`` groups: descriptors from the pipeline's backbone features, stored groups.

The rules and the store are :mod:`backend.grouping.similar`'s; this module reads the images and computes the
descriptors. Images are read and encoded in chunks of ``COSOD_MAX_GROUP_IMAGES``, so memory stays bounded
whatever the project's size. The features go through the pipeline's feature cache (``COSOD_CACHE_DIR``;
``make run`` and the Docker image set one), so the prediction that follows reuses them: the backbone runs
once per image. A task whose image cannot be read stays unassigned (the group of tasks not yet grouped)
and is tried again by the next request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cosod.errors import ImageReadError

from ..errors import BackendError, ImageFetchError, ImageRefusedError, UnknownProjectError
from ..grouping import TaskRef, effective_rule, similar_threshold, tag_similar
from ..grouping.similar import SimilarGroups
from ..labelstudio.client import LabelStudioClient
from ..settings import Settings
from .projects import Project

log = logging.getLogger(__name__)


def descriptors(pipeline: Any, images: Sequence[np.ndarray]) -> np.ndarray:
    """(N, C) float32: per image, the CLS-attention-weighted mean of its L2-normalised patch tokens,
    L2-normalised (see :mod:`backend.grouping.similar`). ``images``: list of HxWx3 uint8 RGB."""
    from cosod.features import image_hash

    feats = pipeline.encode(list(images), [image_hash(im) for im in images])
    tokens = feats.tokens.float()  # (N, h, w, C)
    tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    weights = feats.cls_attention.float().clamp_min(0.0) + 1e-6  # (N, h, w); never all zero
    pooled = (tokens * weights[..., None]).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))[:, None]
    pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return pooled.cpu().numpy().astype(np.float32)


class SimilarGrouper:
    """Tags tasks with their ``similar`` group; assigns the ones not assigned yet."""

    def __init__(self, settings: Settings, ls: LabelStudioClient):
        self.settings = settings
        self.ls = ls
        self.store = SimilarGroups(settings.model_dir)
        self._lock = threading.Lock()  # one assignment at a time per process; others find it done

    @staticmethod
    def applies(project: Project) -> bool:
        return effective_rule(project.group_by) == "similar"

    def tag(self, project: Project, tasks: Sequence[TaskRef]) -> list[TaskRef]:
        """``tasks`` with their stored group (untouched when the project's rule is not ``similar``)."""
        if not self.applies(project):
            return list(tasks)
        return tag_similar(tasks, self.store.lookup(project.id))

    def tag_event(self, project: Project, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        """A webhook payload whose ``task.data`` carries the task's stored group (the payload itself when
        the rule is not ``similar`` or it has no task), so that its correction is filed under that group."""
        task = payload.get("task") if isinstance(payload, Mapping) else None
        if not self.applies(project) or not isinstance(task, Mapping):
            return payload
        data, tid = task.get("data"), task.get("id")
        if not isinstance(data, Mapping) or not isinstance(tid, int) or isinstance(tid, bool):
            return payload
        tagged = tag_similar([TaskRef(tid, dict(data))], self.store.lookup(project.id, [tid]))[0]
        return {**payload, "task": {**task, "data": tagged.data}}

    def resolve(
        self,
        project: Project,
        asked: Sequence[TaskRef],
        pipeline: Any,
        listed: Sequence[TaskRef] | None = None,
        budget: int | None = None,
    ) -> tuple[list[TaskRef], set[int]]:
        """``asked`` tagged with their groups, after assigning the project's tasks that have none, in id
        order, at most ``budget`` of them (None: all); and the ids of the asked tasks still without a group.

        The tasks considered are those Label Studio lists (``listed``, or listed here, again when an asked
        task is missing from the cached list). Without a listing (Label Studio not configured or not
        reachable), the asked tasks are grouped among themselves and with the stored groups for this answer
        only: nothing is stored for tasks Label Studio cannot vouch for. Each chunk of
        ``COSOD_MAX_GROUP_IMAGES`` images is stored as soon as it is grouped, so work cut short is kept."""
        if not self.applies(project):
            return list(asked), set()
        known = self.store.lookup(project.id)
        if listed is None and any(t.id not in known for t in asked):
            listed = self._listed(project, refresh=False)
            if listed is not None and not {t.id for t in asked} <= {t.id for t in listed}:
                listed = self._listed(project, refresh=True)
        persist = listed is not None
        candidates = list(listed) if listed is not None else list(asked)
        if any(t.id not in known for t in candidates):
            with self._lock:
                known = self.store.lookup(project.id)
                todo = sorted({t.id: t for t in candidates if t.id not in known}.values(), key=lambda t: t.id)
                if todo:
                    known = self._assign(project, todo[:budget], pipeline, persist=persist)
        return tag_similar(asked, known), {t.id for t in asked if t.id not in known}

    def _listed(self, project: Project, *, refresh: bool) -> list[TaskRef] | None:
        if not self.ls.configured:
            return None
        try:
            return self.ls.project_tasks(project.id, refresh=refresh)
        except UnknownProjectError:
            raise
        except BackendError as exc:
            log.warning("project %s: grouping only the request's tasks, for now (%s)", project.id, exc)
            return None

    def _assign(
        self, project: Project, todo: list[TaskRef], pipeline: Any, *, persist: bool
    ) -> dict[int, str]:
        image_key = project.config.image_key
        threshold = similar_threshold(project.group_by) or self.settings.similar_threshold
        space = str(getattr(getattr(pipeline, "backbone", None), "id", "") or "")
        step = max(1, self.settings.max_group_images)
        out = self.store.lookup(project.id)
        seen: dict[
            int, np.ndarray
        ] = {}  # without persisting, each chunk is grouped again with the ones before
        grouped = 0
        for start in range(0, len(todo), step):
            part, images = [], []
            for t in todo[start : start + step]:
                try:
                    images.append(self.ls.read_image(t.data.get(image_key), t.id, project_id=project.id))
                    part.append(t.id)
                except (ImageReadError, ImageRefusedError, ImageFetchError, BackendError) as exc:
                    log.warning("project %s task %s: not grouped, image not read (%s)", project.id, t.id, exc)
            if not images:
                continue
            found = dict(zip(part, descriptors(pipeline, images), strict=True))
            seen.update(found)
            out = self.store.assign(
                project.id,
                found if persist else seen,
                space=space,
                threshold=threshold,
                min_size=self.settings.similar_min_group,
                max_size=self.settings.similar_max_group,
                persist=persist,
            )
            grouped += len(found)
        log.info(
            "project %s: %d task(s) grouped by similarity, %d group(s) in all (threshold %.2f)%s",
            project.id,
            grouped,
            len(set(out.values())),
            threshold,
            "" if persist else ", for this answer only (Label Studio did not list the tasks)",
        )
        return out
