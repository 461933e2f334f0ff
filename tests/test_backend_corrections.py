"""handle_event on realistic Label Studio webhook payloads, with a real SQLite file."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_input import zero_rle

from backend.errors import BadRequestError, CorrectionRefusedError, UnknownProjectError
from backend.grouping import GroupKey
from backend.labelstudio.regions import brush_region, decode_rle
from backend.learning import corrections, masks
from backend.learning.corrections import decode_group_key, handle_event, union_brush_mask
from backend.learning.store import Store
from backend.prediction.projects import ProjectRegistry
from backend.settings import Settings

CONFIG = (
    '<View><Image name="image" value="$img"/><BrushLabels name="tag" toName="image">'
    '<Label value="Object"/></BrushLabels></View>'
)


def set_up(root: Path, *projects: int) -> Store:
    """The store under MODEL_DIR ``root``, with ``projects`` (default 12) set up as ``/setup`` does it."""
    registry = ProjectRegistry(Settings(model_dir=str(root)))
    for pid in projects or (12,):
        registry.get(pid, CONFIG, {})
    return Store(root)


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
    store = set_up(tmp_path)
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
    store = set_up(tmp_path)
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
    store = set_up(tmp_path)
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
    store = set_up(tmp_path)
    out = handle_event(
        store, "START_TRAINING", {"action": "START_TRAINING", "project": {"id": 12, "title": "x"}}
    )
    assert out["enqueue"] is True and out["stored"] == "training_requested"
    assert store.training_requested(12)


def test_malformed_payloads_are_refused_with_the_value(tmp_path: Path) -> None:
    store = set_up(tmp_path)
    with pytest.raises(ValueError, match="'abc'"):
        handle_event(store, "ANNOTATION_CREATED", {"project": {"id": "abc"}, "annotation": {"id": 1}})
    with pytest.raises(ValueError, match="needs the task"):
        handle_event(store, "ANNOTATION_CREATED", {"project": {"id": 12}, "annotation": {"id": 1, "task": 4}})
    out = handle_event(store, "PROJECT_UPDATED", {"project": {"id": 3}})
    assert out["stored"] == "ignored" and out["enqueue"] is False


def test_a_burst_of_200_events_is_stored_and_counted(tmp_path: Path) -> None:
    store = set_up(tmp_path)
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


# -- hostile and oversized input (issue 13) ------------------------------------------------------------


def _big_region(h: int, w: int) -> dict[str, Any]:
    return {
        "id": "big",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": zero_rle(4 * h * w), "brushlabels": ["Object"]},
    }


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any RLE decoding fail the test: the checks must come first."""

    def decoded(*args: Any, **kw: Any) -> None:
        raise AssertionError("an RLE was decoded before the correction was checked")

    monkeypatch.setattr(masks, "rle_to_mask_fast", decoded)


def test_zero_rle_is_a_valid_rle() -> None:
    for h, w in ((1, 1), (300, 300), (129, 257)):
        flat = decode_rle(zero_rle(4 * h * w))
        assert flat.size == 4 * h * w and not flat.any()


def test_a_16384_square_brush_region_is_refused_before_decoding_and_not_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = set_up(tmp_path)
    payload = _payload("ANNOTATION_CREATED", ann=7, task=3, regions=[_big_region(16384, 16384)])
    print(f"16384x16384 region: {len(payload['annotation']['result'][0]['value']['rle'])} RLE bytes")
    _no_decoding(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(
        CorrectionRefusedError, match="16384x16384 = 268435456 pixels, over the limit of 50000000"
    ):
        handle_event(store, "ANNOTATION_CREATED", payload)
    print(f"refused in {1000 * (time.perf_counter() - t0):.1f} ms")
    assert CorrectionRefusedError.status == 422 and issubclass(CorrectionRefusedError, BadRequestError)
    assert store.count_corrections(12) == 0 and store.pending(12) == 0
    # the limit is the one of task images (Settings.max_image_pixels), passed by the caller
    small = _payload("ANNOTATION_CREATED", ann=8, task=4, regions=[_region(_mask(30, 40, (1, 5, 1, 5)))])
    with pytest.raises(CorrectionRefusedError, match="30x40 = 1200 pixels, over the limit of 1000"):
        handle_event(store, "ANNOTATION_CREATED", small, max_pixels=1000)
    assert store.count_corrections(12) == 0


def test_a_lying_rle_header_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = set_up(tmp_path)
    region = _region(_mask(20, 20, (2, 8, 2, 8)))
    rle = region["value"]["rle"]
    region["value"]["rle"] = [255, 255, 255, 255, *rle[4:]]  # claims 2**32-1 values
    _no_decoding(monkeypatch)
    with pytest.raises(CorrectionRefusedError, match=r"declares 4294967295 values.*4\*20\*20 = 1600"):
        handle_event(
            store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[region])
        )
    region["value"]["rle"] = rle[:4] + [rle[4] | 0b01111000, *rle[5:]]  # word size 16 bits
    with pytest.raises(CorrectionRefusedError, match="values of 16 bits"):
        handle_event(
            store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[region])
        )
    region["value"]["rle"] = "x" * 100_000
    with pytest.raises(BadRequestError, match="list of ints") as info:
        handle_event(
            store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[region])
        )
    assert len(str(info.value)) < 300
    assert store.count_corrections(12) == 0 and store.pending(12) == 0


def test_a_truncated_rle_with_an_honest_header_is_a_400(tmp_path: Path) -> None:
    store = set_up(tmp_path)
    region = _region(_mask(20, 20, (2, 8, 2, 8)))
    region["value"]["rle"] = region["value"]["rle"][:9]
    with pytest.raises(BadRequestError, match="region 0: truncated RLE"):
        handle_event(
            store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[region])
        )
    assert store.count_corrections(12) == 0


def test_annotation_budgets_and_sizes_are_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = set_up(tmp_path)
    _no_decoding(monkeypatch)
    m = _mask(20, 20, (2, 8, 2, 8))

    def event(regions: list[dict[str, Any]]) -> dict[str, Any]:
        return _payload("ANNOTATION_CREATED", ann=1, task=1, regions=regions)

    # all regions on one image must agree on its size, a polygon's included
    poly = {
        "type": "polygonlabels",
        "from_name": "p",
        "to_name": "image",
        "original_width": 21,
        "original_height": 20,
        "value": {"points": [[1, 1], [5, 5], [1, 5]]},
    }
    with pytest.raises(CorrectionRefusedError, match="disagree on the image size"):
        handle_event(store, "ANNOTATION_CREATED", event([_region(m), poly]))
    # at most MAX_DECODED_IMAGES x max_pixels pixels of brush regions in one annotation
    many = [_region(m, rid=f"r{k}") for k in range(corrections.MAX_DECODED_IMAGES + 1)]
    with pytest.raises(CorrectionRefusedError, match=r"3600 pixels, over the limit of 8 x 400"):
        handle_event(store, "ANNOTATION_CREATED", event(many), max_pixels=400)
    monkeypatch.setattr(masks, "MAX_RLE_BYTES", 30)
    with pytest.raises(CorrectionRefusedError, match="RLE bytes, over the limit of 30 per annotation"):
        handle_event(store, "ANNOTATION_CREATED", event(many))
    monkeypatch.setattr(masks, "MAX_REGIONS", 3)
    with pytest.raises(CorrectionRefusedError, match="9 regions, over the limit of 3"):
        handle_event(store, "ANNOTATION_CREATED", event(many))
    assert store.count_corrections(12) == 0


def test_an_oversized_image_reference_or_group_is_refused_quoted_short(tmp_path: Path) -> None:
    store = set_up(tmp_path)
    p = _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[])
    p["task"]["data"]["img"] = "/data/upload/12/" + "a" * 5_000_000
    with pytest.raises(CorrectionRefusedError, match="5000016 characters, over the limit of 8192") as info:
        handle_event(store, "ANNOTATION_CREATED", p)
    assert len(str(info.value)) < 300
    p = _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[], group="g" * 10_000)
    with pytest.raises(CorrectionRefusedError, match="group is 10019 characters, over the limit of 4096"):
        handle_event(store, "ANNOTATION_CREATED", p)
    assert store.count_corrections(12) == 0


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("annotation", 2**63),
        ("task", 2**63),
        ("project", 2**63),
        ("annotation", "9223372036854775808"),
        ("project", "３"),
        ("project", "12.9"),
    ],
)
def test_ids_that_sqlite_cannot_hold_or_not_ascii_are_a_400(tmp_path: Path, where: str, value: Any) -> None:
    store = set_up(tmp_path)
    p = _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[])
    p[where]["id"] = value
    if where == "task":
        p["annotation"]["task"] = value
    with pytest.raises(
        BadRequestError, match=f"{where} must be a positive integer id below 2\\*\\*63"
    ) as info:
        handle_event(store, "ANNOTATION_CREATED", p)
    assert info.value.status == 400
    assert store.count_corrections(12) == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["task"].update(project=13), "task.project is 13, the event is for project 12"),
        (
            lambda p: p["annotation"].update(project=13),
            "annotation.project is 13, the event is for project 12",
        ),
        (lambda p: p["annotation"].update(task=99), "annotation.task is 99, the event is for task 3"),
    ],
)
def test_a_task_of_another_project_is_refused(tmp_path: Path, edit: Any, message: str) -> None:
    store = set_up(tmp_path, 12, 13)
    p = _payload("ANNOTATION_CREATED", ann=1, task=3, regions=[_region(_mask(10, 10, (1, 3, 1, 3)))])
    edit(p)
    with pytest.raises(CorrectionRefusedError, match=message):
        handle_event(store, "ANNOTATION_CREATED", p)
    assert store.count_corrections(12) == 0 and store.count_corrections(13) == 0


def test_a_project_never_set_up_is_a_404_for_every_learning_event(tmp_path: Path) -> None:
    store = set_up(tmp_path)  # project 12 only
    p = _payload("ANNOTATION_CREATED", ann=1, task=3, regions=[])
    for part in ("project", "task", "annotation"):
        p[part]["project" if part != "project" else "id"] = 77
    events = [
        ("ANNOTATION_CREATED", p),
        ("ANNOTATIONS_DELETED", {"annotations": [{"id": 1}], "project": {"id": 77}}),
        ("START_TRAINING", {"project": {"id": 77}}),
    ]
    for action, payload in events:
        with pytest.raises(UnknownProjectError, match="project 77 is not set up.*/setup") as info:
            handle_event(store, action, payload)
        assert info.value.status == 404
    assert store.projects() == [] and not store.knows_project(77)  # nothing was written for it
    assert handle_event(store, "PROJECT_UPDATED", {"project": {"id": 77}})["stored"] == "ignored"
    # known from persisted state only: a restarted process (new objects) still accepts project 12
    assert (
        handle_event(
            Store(tmp_path), "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=1, task=3, regions=[])
        )["stored"]
        == "inserted"
    )
    # a store that holds state of a project (stored before this check) keeps accepting it
    (tmp_path / "projects" / "12.json").unlink()
    out = handle_event(
        Store(tmp_path), "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=2, task=4, regions=[])
    )
    assert out["stored"] == "inserted"


def test_a_forged_10000_id_deletion_is_one_transaction_and_blocks_no_later_creation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = set_up(tmp_path)
    m = _mask(10, 10, (1, 3, 1, 3))
    handle_event(
        store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=5, task=3, regions=[_region(m)])
    )
    writes = []
    real_write = Store.write

    def counting_write(self: Store) -> Any:
        writes.append(1)
        return real_write(self)

    monkeypatch.setattr(Store, "write", counting_write)
    forged = {"annotations": [{"id": k} for k in range(1, 10_001)], "project": {"id": 12}}
    t0 = time.perf_counter()
    out = handle_event(store, "ANNOTATIONS_DELETED", forged)
    print(f"10,000-id deletion: {time.perf_counter() - t0:.3f} s, {len(writes)} write transaction(s)")
    assert len(writes) == 1
    assert out["stored"] == "deleted" and out["pending"] == 2  # one insert, one stored annotation deleted
    con = sqlite3.connect(store.path)
    try:
        assert con.execute("SELECT project, annotation_id, task_id FROM tombstones").fetchall() == [
            (12, 5, 3)
        ]
    finally:
        con.close()
    # a genuine creation of an id that was in the forged list, never stored before: stored
    p = _payload("ANNOTATION_CREATED", ann=4242, task=9, regions=[_region(m)])
    assert handle_event(store, "ANNOTATION_CREATED", p)["stored"] == "inserted"
    # the same for an unknown project: nothing written at all (a 404), see the test above
    too_many = {"annotations": [{"id": k} for k in range(1, corrections.MAX_DELETE_IDS + 2)], "project": 12}
    with pytest.raises(CorrectionRefusedError, match="100001 annotations, over the limit of 100000"):
        handle_event(store, "ANNOTATIONS_DELETED", too_many)
    assert store.count_corrections(12) == 1


def test_tombstones_drop_late_events_but_not_later_genuine_ones(tmp_path: Path) -> None:
    store = set_up(tmp_path)
    m1, m2 = _mask(10, 10, (1, 3, 1, 3)), _mask(10, 10, (4, 9, 4, 9))
    t0 = "2026-11-22T10:00:00.000000Z"
    created = _payload("ANNOTATION_CREATED", ann=5, task=3, regions=[_region(m1)], updated=t0)
    assert handle_event(store, "ANNOTATION_CREATED", created)["stored"] == "inserted"
    deleted = {"annotation": {"id": 5, "task": 3, "project": 12}, "project": {"id": 12}}
    assert handle_event(store, "ANNOTATION_DELETED", deleted)["stored"] == "deleted"
    # a late re-delivery of the creation, or an update made before the deletion: dropped
    assert handle_event(store, "ANNOTATION_CREATED", created)["stored"] == "deleted_before"
    late = _payload(
        "ANNOTATION_UPDATED", ann=5, task=3, regions=[_region(m2)], updated="2026-11-22T10:01:00Z"
    )
    assert handle_event(store, "ANNOTATION_UPDATED", late)["stored"] == "deleted_before"
    # the same id on another task (a new Label Studio database numbering from 1 again): stored
    other = _payload("ANNOTATION_CREATED", ann=5, task=4, regions=[_region(m2)], updated=t0)
    assert handle_event(store, "ANNOTATION_CREATED", other)["stored"] == "inserted"
    handle_event(store, "ANNOTATION_DELETED", {"annotation": {"id": 5}, "project": {"id": 12}})
    # ... or on the same task, written after the deletion: stored
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    again = _payload("ANNOTATION_CREATED", ann=5, task=4, regions=[_region(m1)], updated=later)
    assert handle_event(store, "ANNOTATION_CREATED", again)["stored"] == "inserted"
    assert [c.annotation_id for c in store.corrections(12)] == [5]


def test_a_skipped_then_resubmitted_annotation_is_stored_again(tmp_path: Path) -> None:
    store = set_up(tmp_path)
    m = _mask(10, 10, (1, 3, 1, 3))
    created = _payload(
        "ANNOTATION_CREATED", ann=5, task=3, regions=[_region(m)], updated="2026-11-22T10:00:00Z"
    )
    handle_event(store, "ANNOTATION_CREATED", created)
    cancel = _payload(
        "ANNOTATION_UPDATED", ann=5, task=3, regions=[], cancelled=True, updated="2026-11-22T10:02:00Z"
    )
    assert handle_event(store, "ANNOTATION_UPDATED", cancel)["stored"] == "deleted"
    assert (
        handle_event(store, "ANNOTATION_CREATED", created)["stored"] == "deleted_before"
    )  # late re-delivery
    resubmit = _payload(
        "ANNOTATION_UPDATED", ann=5, task=3, regions=[_region(m)], updated="2026-11-22T10:03:00Z"
    )
    assert handle_event(store, "ANNOTATION_UPDATED", resubmit)["stored"] == "inserted"
    assert store.count_corrections(12) == 1


# -- BitmaskLabels: the region's mask is a PNG data URL (Label Studio 1.23) --------------------------------


def _bitmask_region(alpha: np.ndarray, rid: str = "m1", from_name: str = "mask") -> dict[str, Any]:
    """A BitmaskLabels region as Label Studio's editor saves a human's strokes: black RGBA, the stroke in
    the alpha channel with anti-aliased edges."""
    import base64
    import io

    from PIL import Image

    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    h, w = alpha.shape
    return {
        "id": rid,
        "type": "bitmasklabels",
        "from_name": from_name,
        "to_name": "image",
        "origin": "manual",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": {
            "imageDataURL": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(),
            "bitmasklabels": ["Object"],
        },
    }


def _stroke(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An alpha channel with a solid core and faint anti-aliased edges, and the mask the editor sees."""
    alpha = np.zeros((h, w), np.uint8)
    alpha[4:10, 6:16] = 255
    alpha[3, 6:16] = 40  # anti-aliased edge: part of the region for the editor (alpha > 0)
    alpha[10, 6:16] = 1
    return alpha, alpha > 0


def test_a_bitmask_annotation_is_stored_as_its_mask(tmp_path: Path) -> None:
    store = set_up(tmp_path)
    alpha, expected = _stroke(20, 30)
    assert expected.sum() == 80
    p = _payload("ANNOTATION_CREATED", ann=9, task=2, regions=[_bitmask_region(alpha)])
    out = handle_event(store, "ANNOTATION_CREATED", p)
    assert out["stored"] == "inserted"
    (c,) = store.corrections(12)
    assert (c.annotation_id, c.task_id, c.width, c.height, c.empty) == (9, 2, 30, 20, False)
    assert c.mask is not None and np.array_equal(c.mask, expected)


def test_brush_and_bitmask_regions_make_one_union(tmp_path: Path) -> None:
    alpha, stroke = _stroke(20, 30)
    brush = _mask(20, 30, (12, 18, 0, 4))
    result = [_region(brush), _bitmask_region(alpha), _bitmask_region(alpha, rid="x", from_name="other")]
    assert np.array_equal(union_brush_mask(result), brush | stroke)
    assert np.array_equal(union_brush_mask(result, from_names=["mask"]), stroke)
    assert union_brush_mask(result, from_names=["nothing"]) is None
    no_url = _bitmask_region(alpha)
    del no_url["value"]["imageDataURL"]
    assert union_brush_mask([no_url]) is None  # no mask in it: skipped, as a brush region without RLE


def test_bitmask_regions_are_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = set_up(tmp_path)
    _no_decoding(monkeypatch)

    def undecoded(*args: Any, **kw: Any) -> None:
        raise AssertionError("a PNG was decoded before the correction was checked")

    monkeypatch.setattr(masks, "data_url_to_mask", undecoded)
    alpha, _ = _stroke(20, 30)

    def event(*regions: dict[str, Any]) -> dict[str, Any]:
        return _payload("ANNOTATION_CREATED", ann=1, task=1, regions=list(regions))

    lying = _bitmask_region(alpha)
    lying["original_width"] = 31
    with pytest.raises(CorrectionRefusedError, match="region 0: its imageDataURL PNG is 30x20 .* is 31x20"):
        handle_event(store, "ANNOTATION_CREATED", event(lying))
    jpeg = _bitmask_region(alpha)
    jpeg["value"]["imageDataURL"] = "data:image/jpeg;base64,/9j/4AAQSkZJRg=="
    with pytest.raises(BadRequestError, match="region 0: imageDataURL must start with") as info:
        handle_event(store, "ANNOTATION_CREATED", event(jpeg))
    assert info.value.status == 400
    with pytest.raises(CorrectionRefusedError, match="20x30 = 600 pixels, over the limit of 500"):
        handle_event(store, "ANNOTATION_CREATED", event(_bitmask_region(alpha)), max_pixels=500)
    many = [_bitmask_region(alpha, rid=f"r{k}") for k in range(corrections.MAX_DECODED_IMAGES + 1)]
    with pytest.raises(CorrectionRefusedError, match="5400 pixels, over the limit of 8 x 600"):
        handle_event(store, "ANNOTATION_CREATED", event(*many), max_pixels=600)
    monkeypatch.setattr(masks, "MAX_BITMASK_CHARS", 100)
    with pytest.raises(
        CorrectionRefusedError, match="bitmasklabels regions up to region 0 hold .* imageDataURL characters"
    ):
        handle_event(store, "ANNOTATION_CREATED", event(_bitmask_region(alpha)))
    assert store.count_corrections(12) == 0


def test_a_bitmask_png_that_does_not_decode_is_a_400(tmp_path: Path) -> None:
    store = set_up(tmp_path)
    alpha, _ = _stroke(20, 30)
    cut = _bitmask_region(alpha)
    head, data = cut["value"]["imageDataURL"].split(",")
    cut["value"]["imageDataURL"] = f"{head},{data[: len(data) // 8 * 4]}"  # the header intact, pixels cut
    with pytest.raises(BadRequestError, match="region 0: imageDataURL is not a readable PNG"):
        handle_event(
            store, "ANNOTATION_CREATED", _payload("ANNOTATION_CREATED", ann=1, task=1, regions=[cut])
        )
    assert store.count_corrections(12) == 0
