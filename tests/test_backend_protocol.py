"""backend.labelstudio.protocol: the one list of webhook events and the one id parser; the job names RQ
stored before the sub-packages existed still resolve."""

from __future__ import annotations

import pytest

from backend.errors import BadRequestError
from backend.labelstudio.protocol import (
    ANNOTATION_EVENTS,
    DELETE_EVENTS,
    LEARNING_EVENTS,
    TRAIN_EVENT,
    changes_membership,
    parse_id,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (12, 12),
        ("12", 12),
        (" 12 ", 12),
        ("12.1795340308", 12),
        ("12.999999999", 12),
        ({"id": 7}, 7),
        ({"id": "7"}, 7),
        (2**63 - 1, 2**63 - 1),
        ("9" * 18, 10**18 - 1),
    ],
)
def test_ids_in_every_form_label_studio_sends(value: object, expected: int) -> None:
    assert parse_id(value, "project") == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -3,
        1.5,
        "abc",
        "",
        ".5",
        {"id": None},
        [1],
        "1e3",
        "3.9",
        "12.1",
        "12.",
        "+3",
        "３",
        "1\u0663",
        "12.123456789012",
        2**63,
        str(2**63),
        {"id": 2**63},
        "9" * 20,
        "0",
    ],
)
def test_anything_else_is_a_400_naming_the_field_and_the_value(value: object) -> None:
    with pytest.raises(BadRequestError, match=r"tasks\[2\] 'id' must be a positive integer id.*got") as info:
        parse_id(value, "tasks[2] 'id'")
    assert repr(value) in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.status == 400


@pytest.mark.parametrize(
    "value", ["9" * 5000, "\u0661\u0662", "\u00b2", "1" * 19, "\ud800", {"id": "x" * 10**6}]
)
def test_hostile_ids_are_a_short_400_not_a_crash(value: object) -> None:
    with pytest.raises(BadRequestError, match="must be a positive integer id") as info:
        parse_id(value, "project")
    assert len(str(info.value)) < 400
    str(info.value).encode("utf-8")


def test_one_list_of_learning_events_with_the_bulk_delete() -> None:
    assert "ANNOTATIONS_DELETED" in DELETE_EVENTS
    assert set(LEARNING_EVENTS) == {*ANNOTATION_EVENTS, *DELETE_EVENTS, TRAIN_EVENT}
    assert changes_membership("TASKS_CREATED") and changes_membership("PROJECT_UPDATED")
    assert not changes_membership("ANNOTATION_CREATED")


def test_job_names_stored_by_earlier_versions_still_resolve() -> None:
    from rq.utils import import_attribute

    import backend.jobs.enqueue as enqueue
    import backend.jobs.finetuning as finetuning
    import backend.jobs.prelabel as prelabel

    assert import_attribute("backend.jobs.prelabel_group") is prelabel.prelabel_group
    assert import_attribute("backend.jobs.prelabel_project") is enqueue.prelabel_project
    assert import_attribute("backend.jobs.finetune") is finetuning.finetune
    # new jobs are stored under the modules' own names
    from backend.jobs.protocol import func_name

    assert func_name(prelabel.prelabel_group) == "backend.jobs.prelabel.prelabel_group"
    assert func_name(finetuning.finetune) == "backend.jobs.finetuning.finetune"
