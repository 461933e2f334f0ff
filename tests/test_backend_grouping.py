"""backend.grouping: rules, tasks without the group field, reference subsets and content digests."""

from __future__ import annotations

from backend.grouping import GroupKey, TaskRef, choose_subset, group_digest, group_key, members

TASKS = [
    TaskRef(1, {"image": "a.png", "group": "cats"}),
    TaskRef(2, {"image": "b.png", "group": "dogs"}),
    TaskRef(3, {"image": "c.png", "group": "cats"}),
    TaskRef(4, {"image": "d.png"}),
    TaskRef(5, {"image": "e.png", "group": ""}),
    TaskRef(6, {"image": "f.png", "group": None, "album": 7}),
]


def test_auto_uses_the_group_field() -> None:
    assert group_key(TASKS[0].data, "auto") == GroupKey("field:group", "cats")
    assert [t.id for t in members(TASKS, group_key(TASKS[0].data, "auto"))] == [1, 3]


def test_tasks_without_the_field_form_one_group() -> None:
    key = group_key(TASKS[3].data, "auto")
    assert key == GroupKey("field:group", None)
    assert [t.id for t in members(TASKS, key)] == [4, 5, 6]  # missing, empty and null all count as "without"


def test_auto_without_any_field_is_the_whole_project() -> None:
    plain = [TaskRef(i, {"image": f"{i}.png"}) for i in range(5)]
    assert [t.id for t in members(plain, group_key(plain[0].data, "auto"))] == list(range(5))


def test_project_and_custom_field() -> None:
    assert [t.id for t in members(TASKS, group_key({}, "project"))] == [1, 2, 3, 4, 5, 6]
    key = group_key(TASKS[5].data, "field:album")
    assert key == GroupKey("field:album", "7") and [t.id for t in members(TASKS, key)] == [6]


def test_members_dedup_and_sort() -> None:
    dup = [TASKS[2], TASKS[0], TaskRef(1, {"image": "other.png", "group": "cats"})]
    got = members(dup, GroupKey("field:group", "cats"))
    assert [t.id for t in got] == [1, 3] and got[0].data["image"] == "a.png"


def test_choose_subset_small_group_is_whole_group() -> None:
    assert choose_subset([5, 3, 9], [9], k=2, limit=10) == [3, 5, 9]


def test_choose_subset_large_group_keeps_wanted_plus_k_spread_refs() -> None:
    ids = list(range(100, 200))
    got = choose_subset(ids, [199, 150], k=4, limit=10)
    assert 199 in got and 150 in got
    assert set(got) - {199, 150} <= {100, 125, 150, 175} and len(got) <= 6
    assert got == choose_subset(list(reversed(ids)), [150, 199], k=4, limit=10)  # deterministic


def test_digest_changes_with_content_only() -> None:
    key = GroupKey("field:group", "cats")
    a = group_digest(key, [TASKS[0], TASKS[2]], "image")
    assert a == group_digest(key, [TASKS[2], TASKS[0]], "image")
    assert a != group_digest(key, [TASKS[0]], "image")
    assert a != group_digest(key, [TASKS[0], TaskRef(3, {"image": "new.png"})], "image")
    assert a != group_digest(GroupKey("field:group", "dogs"), [TASKS[0], TASKS[2]], "image")


def test_a_lone_surrogate_listed_by_label_studio_does_not_break_the_group_digest() -> None:
    task = TaskRef(1, {"image": "/data/upload/1/a\ud800.png", "group": "g\udfff"})
    key = group_key(task.data, "auto")
    assert len(group_digest(key, [task], "image")) == 16
