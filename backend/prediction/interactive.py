"""Interactive calls: ``/predict`` with a ``params.context`` holding prompts (:mod:`.prompts`) on one task.

Label Studio's editor sends one when a ``smart="true"`` keypoint, rectangle or brush is finished on a task
of a project whose ML connection has "Interactive preannotations" on (``POST /api/ml/<id>/
interactive-annotating``; README, "Interactive (smart tools)"). The answer is that task's mask, computed from
the prompt, in the project's usual result format (its BrushLabels / BitmaskLabels / PolygonLabels controls),
with a score and the project's ``model_version``; the editor adds it to the annotation being drawn.

How the prompt becomes a mask (:func:`segment`), through the pipeline's own post-processing:

1. the task image's backbone tokens, through the feature cache (no backbone pass when the image was
   predicted before, as its group was);
2. the positive prompts give a foreground exemplar at the image's size: a keypoint its backbone token cell,
   a rectangle its box, a brush its stroke. With it, :func:`cosod.propagate.correction_prototypes` makes the
   foreground prototype (the prompted tokens) and the background prototype (the rest of the image);
   negative prompts (``is_positive: false``) make a third prototype, averaged into the background one;
3. :func:`cosod.propagate.prototype_maps` and :meth:`Pipeline.masks_from_maps` (the pipeline's threshold,
   region refinement scored against the prompt's prototype, dense CRF, output size), as propagation does;
4. the prompt decides what is kept: the parts of that mask that touch a positive prompt, clipped to the
   rectangles when there are rectangles, without the pixels of negative prompts; a brush stroke is always
   part of the answer. When nothing is left, the answer is the positive prompts' pixels themselves.

The group's stored corrections are not mixed in: a prompt says what the user wants on this image, even
when it is another object than the group's (a keypoint on a distractor selects the distractor).

Then the mask is kept as the task's *provisional exemplar* (:class:`~backend.learning.prompts.PromptStore`,
expiring after ``COSOD_PROMPT_TTL``; never a fine-tune correction; superseded by an annotation of the task)
and the group's propagation job is queued (:mod:`backend.jobs.propagation`), which re-predicts the group's
other unannotated tasks with it and the group's corrections as exemplars. The call returns without waiting
for the job: the response says its id (``interactive.propagation_job``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.nn.functional as F
from scipy import ndimage

from ..errors import BackendError, BadRequestError, ImageRefusedError
from ..grouping import group_key
from ..learning.prompts import PromptStore
from .groupcache import Outcome
from .projects import Project
from .prompts import Prompt, parse_prompts, prompt_mask

if TYPE_CHECKING:
    from .adapter import CoSODModel

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Segmented:
    """What :func:`segment` made: the mask (bool HxW), its score in [0, 1], whether it came from the
    pipeline (False: the fallback to the prompts' own pixels) and seconds per phase."""

    mask: np.ndarray
    score: float
    from_pipeline: bool
    timings: dict[str, float]


def segment(pipeline: Any, image: np.ndarray, prompts: Sequence[Prompt], max_pixels: int) -> Segmented:
    """The mask the ``prompts`` ask for on ``image`` (HxWx3 uint8 RGB), module doc steps 1-4. Raises
    BadRequestError for a prompt that does not fit the image, or when no prompt is positive."""
    from cosod.features import image_hash
    from cosod.methods.base import ModelMaps
    from cosod.propagate import correction_prototypes, prototype_maps
    from cosod.refine import upsample

    t0 = time.perf_counter()
    shape = (int(image.shape[0]), int(image.shape[1]))
    feats = pipeline.encode([image], [image_hash(image)])
    tokens = feats.tokens.float()
    grid = (int(tokens.shape[1]), int(tokens.shape[2]))
    t1 = time.perf_counter()
    pos, neg, strokes = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape, bool)
    clip: np.ndarray | None = None
    for p in prompts:
        m = prompt_mask(p, shape, grid, max_pixels)
        if not p.positive:
            neg |= m
            continue
        pos |= m
        if p.kind == "rectangle":
            clip = m if clip is None else clip | m
        elif p.kind == "brush":
            strokes |= m
    pos &= ~neg
    if not pos.any():
        raise BadRequestError(
            "params.context.result has no positive prompt (is_positive true) outside the negative ones: "
            "nothing says which object to segment"
        )
    protos = correction_prototypes(tokens, {0: pos})
    if neg.any():
        negative = correction_prototypes(tokens, {0: neg}).foreground
        if negative is not None:
            bg = negative if protos.background is None else protos.background + negative
            protos = dataclasses.replace(protos, background=F.normalize(bg, dim=-1))
    grid_maps = prototype_maps(tokens, protos)
    maps = ModelMaps(upsample(grid_maps, pipeline.config.input_size), tokens, grid_maps, [0])
    pred = pipeline.masks_from_maps([image], maps, prototype=protos.foreground, absence=False)
    t2 = time.perf_counter()
    mask = np.asarray(pred.masks[0], dtype=bool)
    if clip is not None:
        mask &= clip
    mask &= ~neg
    mask = _touching(mask, pos) | strokes
    from_pipeline = bool(mask.any())
    if not from_pipeline:
        mask = pos.copy()
    soft = np.asarray(pred.soft[0], dtype=np.float32)
    score = float(soft[mask].mean()) if mask.any() else 0.0
    timings = {"encode": t1 - t0, "segment": t2 - t1, "total": time.perf_counter() - t0}
    return Segmented(mask, score, from_pipeline, timings)


def _touching(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The connected parts (8-connectivity) of ``mask`` that share a pixel with ``seeds``."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    keep = np.unique(labels[seeds & mask])
    return np.isin(labels, keep[keep > 0])


def predict_interactive(
    model: CoSODModel, tasks: Sequence[Any], *, project: Project, context: Any
) -> dict[str, Any] | None:
    """The ``/predict`` answer for a call with prompts (module doc): ``{"results": [item], "interactive":
    {...}}``; None when ``context`` has no prompt (an ordinary prediction). Raises BadRequestError (400) for
    bad prompts or a context for several tasks."""
    from .adapter import _task_ref

    prompts = parse_prompts(context, project.label_config, project.config)
    if not prompts:
        return None
    if len(tasks) != 1:
        raise BadRequestError(
            f"params.context holds prompts on one task, but the request has {len(tasks)} tasks; send one"
        )
    ref, owner = _task_ref(tasks[0], 0)
    if owner is not None and owner != project.id:
        raise BadRequestError(f"task {ref.id} belongs to project {owner}, not to project {project.id}")
    pipeline, version = model.serving(project)
    info: dict[str, Any] = {"task": ref.id, "prompts": [p.kind for p in prompts]}
    grouped = True
    if model.similar.applies(project):
        cap = model.settings.max_predict_tasks
        mine, waiting = model.similar.resolve(project, [ref], pipeline, budget=cap)
        ref, grouped = (mine[0] if mine else ref), ref.id not in waiting
        if not grouped:
            info.update(propagation_job=None, propagation="not propagated: the task has no group yet")
    key = group_key(ref.data, project.group_by, project.config.image_key) if grouped else None
    outsiders = model._members(project, key, [ref])[1] if key is not None else set()
    if ref.id in outsiders:
        raise BadRequestError(f"task {ref.id} is not a task of project {project.id} in Label Studio")
    url = ref.data.get(project.config.image_key)
    try:
        image = model.ls.read_image(url, ref.id, project_id=project.id)
    except BackendError as exc:  # its own status (422 refused, 502 not fetched): the editor shows the reason
        raise type(exc)(f"task {ref.id}: the image was not read: {exc}") from None
    except (ValueError, OSError) as exc:  # not decodable
        raise ImageRefusedError(f"task {ref.id}: the image was not read: {exc}") from None
    with model._compute_lock:
        try:
            seg = segment(pipeline, image, prompts, model.settings.max_image_pixels)
        except BadRequestError:
            raise
        except ValueError as exc:  # cosod's checks of the image or the prompt's mask
            raise BadRequestError(f"task {ref.id}: the prompt cannot be segmented: {exc}") from None
    info.update(from_pipeline=seg.from_pipeline, seconds={k: round(v, 3) for k, v in seg.timings.items()})
    item = model._item(project, ref.id, Outcome(mask=seg.mask, score=seg.score), version)
    for region in item["result"]:  # not the task's prediction: ids of their own, so the editor keeps both
        region["id"] = f"{region['id']}i"
    if key is not None:
        info.update(_queue(model, project, key, ref.id, seg.mask))
    log.info("project %s task %s: interactive %s", project.id, ref.id, info)
    return {"results": [item], "interactive": info}


def _queue(
    model: CoSODModel, project: Project, key: Any, task_id: int, mask: np.ndarray
) -> Mapping[str, Any]:
    """Keep the mask as the task's provisional exemplar and queue the group's propagation job."""
    store = PromptStore(model.settings.model_dir, model.settings.prompt_ttl)
    return model.queue_propagation(project, key, task_id, before=lambda: store.put(project.id, task_id, mask))


__all__ = ["Segmented", "predict_interactive", "segment"]
