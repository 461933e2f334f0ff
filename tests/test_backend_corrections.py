"""handle_event on realistic Label Studio webhook payloads, with a real SQLite file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.grouping import GroupKey
from backend.labelstudio.regions import brush_region
from backend.learning.corrections import decode_group_key, handle_event, union_brush_mask
from backend.learning.store import Store

CONFIG = (
    '<View><Image name="image" value="$img"/><BrushLabels name="tag" toName="image">'
    '<Label value="Object"/></BrushLabels></View>'
)


def _mask(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[box[0] : box[1], box[2] : box[3]] = True
    return m


def _payload(
    action: str,
    *,
    ann: int,
    task: int,
    regions: list[dict[str, Any]],
    group: str | None = "cats",
    cancelled: bool = False,
    updated: str = "2026-11-22T10:00:00.000000Z",
) -> dict[str, Any]:
    data: dict[str, Any] = {"img": f"/data/upload/12/{task}-photo.png"}
    if group is not None:
        data["group"] = group
    return {
        "action": action,
        "annotation": {
            "id": ann,
            "result": regions,
            "was_cancelled": cancelled,
            "ground_truth": False,
            "created_at": "2026-11-22T09:59:00.000000Z",
            "updated_at": updated,
            "lead_time": 12.5,
            "task": task,
            "project": 12,
            "completed_by": 1,
            "prediction": {},
            "parent_prediction": 40 + task,
        },
        "task": {
            "id": task,
            "data": data,
            "annotations": [],
            "predictions": [],
            "project": 12,
            "is_labeled": True,
            "total_annotations": 1,
        },
        "project": {
            "id": 12,
            "title": "cosod",
            "label_config": CONFIG,
            "model_version": "scosparc-p12-0a1b2c3d",
        },
    }


def _region(mask: np.ndarray, rid: str = "r1", from_name: str = "tag") -> dict[str, Any]:
    return brush_region(mask, from_name=from_name, to_name="image", label="Object", score=1.0, rid=rid)


def test_created_updated_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    m1 = _mask(30, 40, (5, 20, 10, 30))
    out = handle_event(
        store,
        "ANNOTATION_CREATED",
        _payload("ANNOTATION_CREATED", ann=7, task=3, regions=[_region(m1)]),
        train_every=3,
    )
    assert out == {
        "action": "ANNOTATION_CREATED",
        "project": 12,
        "task": 3,
        "annotation": 7,
        "stored": "inserted",
        "pending": 1,
        "enqueue": False,
        "reason": "1 of 3 changes pending",
    }
    (c,) = store.corrections(12)
    assert np.array_equal(c.mask, m1)
    assert c.image_url == "/data/upload/12/3-photo.png"
    assert decode_group_key(c.group_key) == GroupKey("field:group", "cats")
    assert c.image_hash is None  # filled by the fine-tune job, not by the webhook

    again = handle_event(
        store,
        "ANNOTATION_CREATED",
        _payload("ANNOTATION_CREATED", ann=7, task=3, regions=[_region(m1)]),
        train_every=3,
    )
    assert again["stored"] == "unchanged" and again["pending"] == 1

    m2 = _mask(30, 40, (0, 10, 0, 10))
    upd = handle_event(
        store,
        "ANNOTATION_UPDATED",
        _payload("ANNOTATION_UPDATED", ann=7, task=3, regions=[_region(m2)], updated="2026-11-22T10:05:00Z"),
        train_every=3,
    )
    assert upd["stored"] == "updated"
    assert np.array_equal(store.corrections(12)[0].mask, m2)

    gone = handle_event(
        store,
        "ANNOTATIONS_DELETED",
        {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 7}], "project": {"id": 12}},
        train_every=3,
    )
    assert gone["stored"] == "deleted" and gone["pending"] == 3 and gone["enqueue"] is True
    assert store.corrections(12) == []


def test_union_of_regions_and_other_controls_ignored(tmp_path: Path) -> None:
    a, b = _mask(20, 20, (0, 5, 0, 5)), _mask(20, 20, (10, 20, 10, 20))
    other = _region(_mask(20, 20, (5, 10, 5, 10)), rid="x", from_name="other")
    polygon = {"type": "polygonlabels", "from_name": "poly", "value": {"points": [[1, 1], [5, 5], [1, 5]]}}
    result = [_region(a, "a"), _region(b, "b"), other, polygon]
    assert np.array_equal(union_brush_mask(result, from_names=["tag"]), a | b)
    assert np.array_equal(union_brush_mask(result), a | b | _mask(20, 20, (5, 10, 5, 10)))
    assert union_brush_mask([polygon]) is None
    bad = _region(a)
    bad["original_width"] = 21
    with pytest.raises(ValueError, match="4\\*20\\*21"):
        union_brush_mask([bad])


def test_empty_cancelled_and_polygon_only_annotations(tmp_path: Path) -> None:
    store = Store(tmp_path)
    empty = handle_event(
        store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[])
    )
    assert empty["stored"] == "inserted"
    assert store.corrections(12)[0].empty
    poly = [{"type": "polygonlabels", "from_name": "p", "to_name": "image", "value": {"points": []}}]
    out = handle_event(
        store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=2, task=2, regions=poly)
    )
    assert out["stored"] == "ignored"
    m = _mask(10, 10, (1, 3, 1, 3))
    handle_event(
        store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=3, task=3, regions=[_region(m)])
    )
    skipped = handle_event(
        store, "ANNOTATION_UPDATED", _payload("ANNOTATION_UPDATED", ann=3, task=3, regions=[], cancelled=True)
    )
    assert skipped["stored"] == "deleted"
    assert [c.task_id for c in store.corrections(12)] == [1]


def test_group_without_the_field_and_project_rule(tmp_path: Path) -> None:
    store = Store(tmp_path)
    m = _mask(10, 10, (1, 3, 1, 3))
    handle_event(
        store,
        "ANNOTATION_CREATED",
        _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[_region(m)], group=None),
    )
    handle_event(
        store,
        "ANNOTATION_CREATED",
        _payload("ANNOTATION_CREATED", ann=2, task=2, regions=[_region(m)]),
        group_by="project",
    )
    keys = [decode_group_key(c.group_key) for c in store.corrections(12)]
    assert keys == [GroupKey("field:group", None), GroupKey("project", None)]


def test_start_training_asks_for_a_finetune(tmp_path: Path) -> None:
    store = Store(tmp_path)
    out = handle_event(
        store, "START_TRAINING", {"action": "START_TRAINING", "project": {"id": 12, "title": "x"}}
    )
    assert out["enqueue"] is True and out["stored"] == "training_requested"
    assert store.training_requested(12)


def test_malformed_payloads_are_refused_with_the_value(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="'abc'"):
        handle_event(store, "ANNOTATION_CREATED", {"project": {"id": "abc"}, "annotation": {"id": 1}})
    with pytest.raises(ValueError, match="needs the task"):
        handle_event(store, "ANNOTATION_CREATED", {"project": {"id": 1}, "annotation": {"id": 1, "task": 4}})
    out = handle_event(store, "PROJECT_UPDATED", {"project": {"id": 3}})
    assert out["stored"] == "ignored" and out["enqueue"] is False


def test_a_burst_of_200_events_is_stored_and_counted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    rng = np.random.default_rng(0)
    payloads = []
    for k in range(200):
        m = np.zeros((480, 640), bool)
        y, x = rng.integers(0, 300), rng.integers(0, 400)
        m[y : y + 150, x : x + 200] = True
        m |= rng.random((480, 640)) < 0.002  # a few brush specks
        payloads.append(
            _payload("ANNOTATION_CREATED", ann=1000 + k, task=k + 1, regions=[_region(m)], group=f"g{k % 5}")
        )
    enqueued = 0
    for p in payloads:  # the time per event is measured by bench/webhook.py
        out = handle_event(store, "ANNOTATION_CREATED", p, train_every=10)
        enqueued += out["enqueue"]
    assert store.count_corrections(12) == 200
    assert enqueued == 191  # from the 10th change on, until a fine-tune resets the counter
