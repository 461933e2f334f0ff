"""Webhook events -> stored corrections, and whether a fine-tune is due. Cheap on purpose (Label Studio
waits 1 s for ``/webhook``): it checks the event, decodes the mask and writes one SQLite transaction; it never
downloads the image (the fine-tune job reads it and fills in the content hash).

Events handled (``payload`` as Label Studio sends it, protocol doc §1.1 and §5.4):

- ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``: ``{"annotation": {...}, "task": {...}, "project": {...}}``.
  The mask is the union of the annotation's BrushLabels regions (``value.format == "rle"``) and
  BitmaskLabels regions (``value.imageDataURL``, a PNG whose alpha is the mask:
  :mod:`backend.labelstudio.bitmask`), at ``original_height x original_width``. Regions of other controls
  are ignored.
- ``ANNOTATION_DELETED`` (``annotation``) and ``ANNOTATIONS_DELETED`` (``annotations: [{"id": ...}]``):
  the stored corrections are removed, all ids of one event in one transaction.
- ``START_TRAINING``: ``{"project": {...}}``; asks for a fine-tune.

Empty annotations: an annotation whose ``result`` is empty is stored as an **empty-mask correction** ("there
is no common object in this image"; its size comes from the image when the fine-tune reads it). So is an
annotation that selects the config's "no common object" choice (:mod:`backend.labelstudio.choices`; the
project's ``LabelConfig.absence``), with or without brush regions: the choice wins. A cancelled
(skipped) annotation is **ignored**, and removes an earlier correction of the same annotation. An
annotation with regions but no brush or bitmask region (e.g. only polygons) is ignored.

**What is refused** (nothing is stored; the error is a :class:`~backend.errors.BackendError` with a 4xx
status whose message names the rule, values quoted cut short). Every check runs before any mask is decoded:

- a project that is not set up (:func:`project_is_set_up`): :class:`~backend.errors.UnknownProjectError`
  (404), for every learning event, START_TRAINING and deletions included;
- ids that are not ints in 1..2**63-1 (:func:`~backend.labelstudio.protocol.parse_id`): 400;
- an event whose ``task.project`` or ``annotation.project`` is another project, or whose
  ``annotation.task`` is another task than ``task.id``: :class:`~backend.errors.CorrectionRefusedError`
  (422);
- a brush or bitmask region whose ``original_width * original_height`` is over ``max_pixels``
  (``COSOD_MAX_IMAGE_PIXELS``, 50 Mpx by default: the limit of task images, since a correction is a mask of
  its task's image); regions (of any control on the same image) that disagree on the image size; an RLE
  whose header does not declare exactly ``4 * original_width * original_height`` values of 8 bits (the brush
  format stores RGBA); an ``imageDataURL`` that is not a ``data:image/png;base64,`` PNG whose header
  declares ``original_width x original_height``; more than :data:`MAX_RLE_BYTES` bytes of RLE,
  :data:`MAX_BITMASK_CHARS` characters of ``imageDataURL``, :data:`MAX_DECODED_IMAGES` x ``max_pixels``
  pixels of brush and bitmask regions, or :data:`MAX_REGIONS` regions in one annotation; an image
  reference over :data:`MAX_URL_CHARS` characters or a group value over :data:`MAX_GROUP_CHARS`: 422;
- more than :data:`MAX_DELETE_IDS` ids in one deletion: 422 (nothing is deleted).

The task's image is not read here (that would break the 1 s budget), so a correction's size is checked
against the limit and the annotation's other regions, not against the image itself; the fine-tune resizes
each mask to its image.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cosod.imageio import DEFAULT_MAX_PIXELS

from ..errors import BadRequestError, CorrectionRefusedError, UnknownProjectError, quote
from ..grouping import GroupKey, group_key
from ..labelstudio.choices import AbsenceChoice, selects_absence
from ..labelstudio.protocol import (
    ANNOTATION_EVENTS,
    DELETE_EVENTS,
    LEARNING_EVENTS,
    TRAIN_EVENT,
    parse_id,
)
from .masks import (  # noqa: F401 (the limits are documented, tested and used here by these names)
    MAX_BITMASK_CHARS,
    MAX_DECODED_IMAGES,
    MAX_REGIONS,
    MAX_RLE_BYTES,
    union_brush_mask,
)
from .rows import ls_time
from .store import Store

log = logging.getLogger(__name__)

DEFAULT_TRAIN_EVERY = 10
MAX_DELETE_IDS = 100_000  # ids in one ANNOTATIONS_DELETED event (one transaction, well under a second)
MAX_URL_CHARS = 8192  # the task's image reference (a presigned URL is ~1-2 KB; a data: URI is refused)
MAX_GROUP_CHARS = 4096  # the stored group key (the task's group field)
MAX_TIME_CHARS = 64  # the annotation's updated_at
# MODEL_DIR/projects/<id>.json holds a project's /setup state (written by backend.prediction.projects)
PROJECTS_DIR = "projects"


def encode_group_key(key: GroupKey) -> str:
    """The stored form of a group key: JSON ``[rule, value]`` (value null for "tasks without the field")."""
    return json.dumps([key.rule, key.value])


def decode_group_key(text: str) -> GroupKey:
    rule, value = json.loads(text)
    return GroupKey(str(rule), None if value is None else str(value))


def _image_url(data: Mapping[str, Any], image_key: str | None) -> str:
    if image_key and isinstance(data.get(image_key), str):
        url = str(data[image_key])
    else:  # no key known: the first string that looks like an image reference
        found = [
            v
            for v in data.values()
            if isinstance(v, str) and v.startswith(("/data/", "http://", "https://", "s3://", "gs://"))
        ]
        if not found:
            raise BadRequestError(
                f"task data has no image reference under {quote(image_key)}: keys {quote(sorted(data))}"
            )
        url = found[0]
    if len(url) > MAX_URL_CHARS:
        raise CorrectionRefusedError(
            f"the task's image reference is {len(url)} characters, over the limit of {MAX_URL_CHARS}: "
            f"{quote(url)}"
        )
    return url


def _image_key(project: Mapping[str, Any]) -> str | None:
    xml = project.get("label_config") if isinstance(project, Mapping) else None
    if not isinstance(xml, str) or not xml.strip():
        return None
    from ..labelstudio.labelconfig import parse_label_config

    try:
        return parse_label_config(xml).image_key
    except Exception:  # a config this backend cannot fill: fall back to guessing from the data
        return None


def project_is_set_up(store: Store, project: int) -> bool:
    """Whether ``project`` is known to this backend, from persisted state only (so a restart changes
    nothing): ``/setup`` (or a ``/predict`` with its label config) was received for it, which writes
    ``MODEL_DIR/projects/<id>.json``, or the store already holds state of it (corrections, counters or
    versions, e.g. from before this check existed). Label Studio calls ``/setup`` when the model is
    connected, before it sends any webhook."""
    return (store.root / PROJECTS_DIR / f"{project}.json").is_file() or store.knows_project(project)


def _check_same(what: str, value: Any, expected: int, where: str) -> None:
    """``value`` (an id or an object with one, if present) must be ``expected``."""
    if value is None:
        return
    got = parse_id(value, where)
    if got != expected:
        raise CorrectionRefusedError(f"{where} is {got}, the event is for {what} {expected}")


def handle_event(
    store: Store,
    action: str,
    payload: Mapping[str, Any],
    *,
    group_by: str = "auto",
    image_key: str | None = None,
    from_names: Sequence[str] | None = None,
    train_every: int = DEFAULT_TRAIN_EVERY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    known: Callable[[int], bool] | None = None,
    min_corrections: int = 1,
    absence: AbsenceChoice | None = None,
) -> dict[str, Any]:
    """Store (or delete) the correction an event carries; say whether a fine-tune should be enqueued.

    ``group_by``: the project's grouping rule (``Project.group_by``); ``image_key``: the task data key of the
    image (``Project.config.image_key``; default: from the payload's label config); ``from_names``: the
    BrushLabels controls to read (default all); ``max_pixels``: the pixel limit of one brush region
    (``Settings.max_image_pixels``); ``known``: whether a project is set up (default
    :func:`project_is_set_up`); ``absence``: the config's "no common object" choice (an annotation selecting
    it is an empty correction). Returns ``{"action", "project", "task", "annotation", "stored", "pending",
    "enqueue", "reason"}``; ``enqueue`` is True on START_TRAINING or when the project has at least
    ``train_every`` changes since its last fine-tune, and it stores at least ``min_corrections`` corrections
    (``COSOD_FINETUNE_MIN_CORRECTIONS``; below that ``reason`` says how many, and a START_TRAINING stays
    requested: the fine-tune is enqueued by the event that brings the count up). Raises a 4xx
    :class:`~backend.errors.BackendError` (module doc) on a malformed or refused event; a refused event
    changes nothing.
    """
    if not isinstance(payload, Mapping):
        raise BadRequestError(f"webhook payload must be an object, got {type(payload).__name__}")
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
    is_known = known or (lambda p: project_is_set_up(store, p))
    if action in LEARNING_EVENTS and not is_known(pid):
        raise UnknownProjectError(
            f"project {pid} is not set up on this backend (no /setup was received for it and nothing is "
            "stored for it): connect the model to the project in Label Studio (Settings > Model), "
            "which calls /setup, then save the annotation again"
        )
    stored = "ignored"
    if action == TRAIN_EVENT:
        store.request_training(pid)
        stored = "training_requested"
    elif action in DELETE_EVENTS:
        ids = _deleted_ids(pid, payload, annotation)
        removed = store.delete_corrections(pid, ids)
        stored = "deleted" if removed else "unchanged"
        out["annotation"] = ids[0] if len(ids) == 1 else None
    elif action in ANNOTATION_EVENTS:
        stored = _store_annotation(
            store, pid, payload, out, group_by, image_key, from_names, max_pixels, absence
        )
    pending = store.pending(pid)
    requested = action == TRAIN_EVENT or store.training_requested(pid)
    enqueue = requested or pending >= train_every
    reason = "training requested" if requested else f"{pending} of {train_every} changes pending"
    have = store.count_corrections(pid) if enqueue and min_corrections > 1 else min_corrections
    if have < min_corrections:
        enqueue = False
        reason = (
            f"not enough corrections yet: {have} of {min_corrections} (COSOD_FINETUNE_MIN_CORRECTIONS)"
            + ("; training starts once there are enough" if requested else "")
        )
    out.update(stored=stored, pending=pending, enqueue=enqueue, reason=reason)
    log.info("webhook %s project=%s task=%s: %s (%s)", action, pid, out["task"], stored, reason)
    return out


def _deleted_ids(pid: int, payload: Mapping[str, Any], annotation: Any) -> list[int]:
    """The annotation ids a deletion event names (at most :data:`MAX_DELETE_IDS`), each checked."""
    items = payload.get("annotations")
    if items is None:
        items = [annotation] if annotation is not None else []
    if not isinstance(items, list):
        raise BadRequestError(f"'annotations' must be a list of {{'id': ...}}, got {type(items).__name__}")
    if len(items) > MAX_DELETE_IDS:
        raise CorrectionRefusedError(
            f"the event deletes {len(items)} annotations, over the limit of {MAX_DELETE_IDS} per event; "
            "nothing was deleted"
        )
    ids = []
    for k, item in enumerate(items):
        ids.append(parse_id(item, f"annotations[{k}]"))
        if isinstance(item, Mapping):
            _check_same("project", item.get("project"), pid, f"annotations[{k}].project")
    return ids


def _store_annotation(
    store: Store,
    pid: int,
    payload: Mapping[str, Any],
    out: dict[str, Any],
    group_by: str,
    image_key: str | None,
    from_names: Sequence[str] | None,
    max_pixels: int,
    absence: AbsenceChoice | None = None,
) -> str:
    annotation = payload.get("annotation")
    if not isinstance(annotation, Mapping):
        raise BadRequestError(f"{out['action']} needs an 'annotation' object, got {quote(annotation)}")
    aid = parse_id(annotation, "annotation")
    task = payload.get("task") if isinstance(payload.get("task"), Mapping) else None
    tid = parse_id(task if task is not None else annotation.get("task"), "task")
    out.update(annotation=aid, task=tid)
    _check_same("project", annotation.get("project"), pid, "annotation.project")
    _check_same("task", annotation.get("task"), tid, "annotation.task")
    if task is not None:
        _check_same("project", task.get("project"), pid, "task.project")
    updated = annotation.get("updated_at") or annotation.get("created_at") or ""
    if not isinstance(updated, str) or len(updated) > MAX_TIME_CHARS:
        raise BadRequestError(f"annotation.updated_at must be an ISO 8601 time, got {quote(updated)}")
    if annotation.get("was_cancelled"):
        event_time = ls_time(updated)
        removed = store.delete_correction(pid, aid, cutoff=time.time() if event_time is None else event_time)
        return "deleted" if removed else "ignored"
    if task is None or not isinstance(task.get("data"), Mapping):
        raise BadRequestError(f"{out['action']} for annotation {aid} needs the task with its 'data'")
    result = annotation.get("result") or []
    if selects_absence(result, absence):
        mask = None  # "no common object here", whatever the brush says
    else:
        mask = union_brush_mask(result, from_names=from_names, max_pixels=max_pixels)
        if mask is None and result:
            return "ignored"  # regions, but none of ours
    data = task["data"]
    key = image_key or _image_key(payload.get("project") or {})
    url = _image_url(data, key)
    if key is None:  # the key whose value _image_url took (the filename rule reads the image's name)
        key = next((k for k, v in data.items() if v == url), "image")
    gkey = encode_group_key(group_key(data, group_by, key))
    if len(gkey) > MAX_GROUP_CHARS:
        raise CorrectionRefusedError(
            f"the task's group is {len(gkey)} characters, over the limit of {MAX_GROUP_CHARS}: {quote(gkey)}"
        )
    return store.put_correction(
        project=pid,
        annotation_id=aid,
        task_id=tid,
        group_key=gkey,
        image_url=url,
        mask=mask,
        ls_updated=updated,
    )
