"""Webhook events -> stored corrections, and whether a fine-tune is due. Cheap on purpose (Label Studio
waits 1 s for ``/webhook``): it decodes the RLE and writes one SQLite row; it never downloads the image
(the fine-tune job reads it and fills in the content hash).

Events handled (``payload`` as Label Studio sends it, protocol doc §1.1 and §5.4):

- ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: ``{"annotation": {...}, "task": {...}, "project": {...}}``.
  The mask is the union of the annotation's BrushLabels regions (``value.format == "rle"``), at
  ``original_height x original_width``. Regions of other controls are ignored.
- ``ANNOTATION_DELETED`` (``annotation``) and ``ANNOTATIONS_DELETED`` (``annotations: [{"id": ...}]``):
  the stored corrections are removed.
- ``START_TRAINING``: ``{"project": {...}}``; asks for a fine-tune.

Empty annotations: an annotation whose ``result`` is empty is stored as an **empty-mask correction** ("there
is no common object in this image"; its size comes from the image when the fine-tune reads it). A cancelled
(skipped) annotation is **ignored**, and removes an earlier correction of the same annotation. An
annotation with regions but no brush region (e.g. only polygons) is ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..grouping import GroupKey, group_key
from ..labelstudio.protocol import ANNOTATION_EVENTS, DELETE_EVENTS, TRAIN_EVENT, parse_id
from ..labelstudio.regions import rle_to_mask_fast
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_TRAIN_EVERY = 10


def encode_group_key(key: GroupKey) -> str:
    """The stored form of a group key: JSON ``[rule, value]`` (value null for "tasks without the field")."""
    return json.dumps([key.rule, key.value])


def decode_group_key(text: str) -> GroupKey:
    rule, value = json.loads(text)
    return GroupKey(str(rule), None if value is None else str(value))


def union_brush_mask(
    result: Sequence[Mapping[str, Any]], *, from_names: Sequence[str] | None = None
) -> np.ndarray | None:
    """bool HxW union of the BrushLabels regions in an annotation ``result``; None when there is none.

    ``from_names``: only regions of these controls (default: every brushlabels region). Raises ValueError
    when two regions disagree on the image size or an RLE does not fit its size.
    """
    if not isinstance(result, Sequence) or isinstance(result, (str, bytes)):
        raise ValueError(f"annotation result must be a list of regions, got {type(result).__name__}")
    mask: np.ndarray | None = None
    for k, region in enumerate(result):
        if not isinstance(region, Mapping) or str(region.get("type", "")).lower() != "brushlabels":
            continue
        if from_names is not None and region.get("from_name") not in from_names:
            continue
        value = region.get("value")
        if not isinstance(value, Mapping) or value.get("format", "rle") != "rle" or "rle" not in value:
            log.debug("region %d has no RLE; skipped", k)
            continue
        h, w = region.get("original_height"), region.get("original_width")
        if not isinstance(h, int) or not isinstance(w, int) or h < 1 or w < 1:
            raise ValueError(
                f"region {k}: original_height/original_width must be positive ints, got {h!r}/{w!r}"
            )
        part = rle_to_mask_fast(value["rle"], h, w) > 0
        if mask is None:
            mask = part
        elif mask.shape != part.shape:
            raise ValueError(f"region {k} is {part.shape[0]}x{part.shape[1]}, earlier ones {mask.shape}")
        else:
            mask |= part
    return mask


def _image_url(data: Mapping[str, Any], image_key: str | None) -> str:
    if image_key and isinstance(data.get(image_key), str):
        return str(data[image_key])
    for value in data.values():  # no key known: the first string that looks like an image reference
        if isinstance(value, str) and (value.startswith(("/data/", "http://", "https://", "s3://", "gs://"))):
            return value
    raise ValueError(f"task data has no image reference under {image_key!r}: keys {sorted(data)}")


def _image_key(project: Mapping[str, Any]) -> str | None:
    xml = project.get("label_config") if isinstance(project, Mapping) else None
    if not isinstance(xml, str) or not xml.strip():
        return None
    from ..labelstudio.labelconfig import parse_label_config

    try:
        return parse_label_config(xml).image_key
    except Exception:  # a config this backend cannot fill: fall back to guessing from the data
        return None


def handle_event(
    store: Store,
    action: str,
    payload: Mapping[str, Any],
    *,
    group_by: str = "auto",
    image_key: str | None = None,
    from_names: Sequence[str] | None = None,
    train_every: int = DEFAULT_TRAIN_EVERY,
) -> dict[str, Any]:
    """Store (or delete) the correction an event carries; say whether a fine-tune should be enqueued.

    ``group_by``: the project's grouping rule (``Project.group_by``); ``image_key``: the task data key of the
    image (``Project.config.image_key``; default: from the payload's label config); ``from_names``: the
    BrushLabels controls to read (default all). Returns ``{"action", "project", "task", "annotation",
    "stored", "pending", "enqueue", "reason"}``; ``enqueue`` is True on START_TRAINING or when the project has
    at least ``train_every`` changes since its last fine-tune. Raises ValueError on a malformed payload.
    """
    if not isinstance(payload, Mapping):
        raise ValueError(f"webhook payload must be an object, got {type(payload).__name__}")
    if train_every < 1:
        raise ValueError(f"train_every must be >= 1, got {train_every!r}")
    out: dict[str, Any] = {"action": action, "project": None, "task": None, "annotation": None}
    project_obj = payload.get("project")
    annotation = payload.get("annotation")
    if project_obj is None and isinstance(annotation, Mapping):
        project_obj = annotation.get("project")
    if project_obj is None:
        out.update(stored="ignored", pending=0, enqueue=False, reason="no project in the payload")
        return out
    pid = parse_id(project_obj, "project")
    out["project"] = pid
    stored = "ignored"
    if action == TRAIN_EVENT:
        store.request_training(pid)
        stored = "training_requested"
    elif action in DELETE_EVENTS:
        items = payload.get("annotations") or ([annotation] if annotation is not None else [])
        removed = [store.delete_correction(pid, parse_id(a, "annotation")) for a in items]
        stored = "deleted" if any(removed) else "unchanged"
        out["annotation"] = parse_id(items[0], "annotation") if len(items) == 1 else None
    elif action in ANNOTATION_EVENTS:
        stored = _store_annotation(store, pid, payload, out, group_by, image_key, from_names)
    pending = store.pending(pid)
    requested = action == TRAIN_EVENT or store.training_requested(pid)
    enqueue = requested or pending >= train_every
    reason = "training requested" if requested else f"{pending} of {train_every} changes pending"
    out.update(stored=stored, pending=pending, enqueue=enqueue, reason=reason)
    log.info("webhook %s project=%s task=%s: %s (%s)", action, pid, out["task"], stored, reason)
    return out


def _store_annotation(
    store: Store,
    pid: int,
    payload: Mapping[str, Any],
    out: dict[str, Any],
    group_by: str,
    image_key: str | None,
    from_names: Sequence[str] | None,
) -> str:
    annotation = payload.get("annotation")
    if not isinstance(annotation, Mapping):
        raise ValueError(f"{out['action']} needs an 'annotation' object, got {annotation!r}")
    aid = parse_id(annotation, "annotation")
    task = payload.get("task") if isinstance(payload.get("task"), Mapping) else None
    tid = parse_id(task if task is not None else annotation.get("task"), "task")
    out.update(annotation=aid, task=tid)
    if annotation.get("was_cancelled"):
        return "deleted" if store.delete_correction(pid, aid) else "ignored"
    if task is None or not isinstance(task.get("data"), Mapping):
        raise ValueError(f"{out['action']} for annotation {aid} needs the task with its 'data'")
    result = annotation.get("result") or []
    mask = union_brush_mask(result, from_names=from_names)
    if mask is None and result:
        return "ignored"  # regions, but none of ours
    data = task["data"]
    key = image_key or _image_key(payload.get("project") or {})
    return store.put_correction(
        project=pid,
        annotation_id=aid,
        task_id=tid,
        group_key=encode_group_key(group_key(data, group_by)),
        image_url=_image_url(data, key),
        mask=mask,
        ls_updated=str(annotation.get("updated_at") or ""),
    )
