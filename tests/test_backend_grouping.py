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


# -- filename:<regex> ------------------------------------------------------------------------------------


def test_file_name_strips_label_studios_upload_prefix_and_reads_every_kind_of_reference() -> None:
    from backend.grouping import file_name

    assert file_name("/data/upload/6/37a076de-synth_00_0.png") == "synth_00_0.png"
    assert file_name("/data/local-files/?d=shots/box%201/cat_1.png") == "cat_1.png"
    assert file_name("s3://bucket/a/b%20c.png") == "b c.png"
    assert file_name("https://host/x/z.jpg?token=1#f") == "z.jpg"
    assert file_name("/data/upload/1/abcdefgz-x.png") == "abcdefgz-x.png"  # not 8 hex: not a prefix
    assert file_name("/data/upload/1/37a076de-") == "37a076de-"  # nothing after it: kept
    assert file_name(None) is None and file_name("") is None and file_name(7) is None


def test_filename_rule_groups_by_the_first_capture_group() -> None:
    rule = r"filename:^(.+)_\d+\.\w+$"
    tasks = [
        TaskRef(1, {"image": "/data/upload/3/0a1b2c3d-mug_1.png"}),
        TaskRef(2, {"image": "/data/upload/3/ffffffff-mug_2.jpg"}),
        TaskRef(3, {"image": "/data/upload/3/12345678-shoe_1.png"}),
        TaskRef(4, {"image": "/data/upload/3/12345678-readme.txt"}),  # no match
    ]
    assert group_key(tasks[0].data, rule) == GroupKey(rule, "mug")
    assert [t.id for t in members(tasks, GroupKey(rule, "mug"))] == [1, 2]
    assert [t.id for t in members(tasks, GroupKey(rule, "shoe"))] == [3]
    assert group_key(tasks[3].data, rule) == GroupKey(rule, None)
    # the image is read from the config's data key
    assert group_key({"photo": "mug_9.png"}, rule, "photo") == GroupKey(rule, "mug")
    assert group_key({"photo": "mug_9.png"}, rule) == GroupKey(rule, None)


def test_filename_rule_is_validated_where_it_is_given() -> None:
    import pytest

    from backend.rules import parse_group_by

    assert parse_group_by(r"filename:^(\w+)-") == r"filename:^(\w+)-"
    for bad, words in [
        ("filename:", "needs a regex"),
        ("filename:cat_\\d+", "needs a capture group"),
        ("filename:(unclosed", "compiles"),
        ("filename:(" + "a" * 300 + ")", "at most 200"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_group_by(bad)


# -- similar ----------------------------------------------------------------------------------------------


def test_similar_rule_forms() -> None:
    import pytest

    from backend.grouping import effective_rule, similar_threshold
    from backend.rules import parse_group_by

    assert parse_group_by("similar") == "similar" and parse_group_by("Similar:0.50") == "similar:0.5"
    assert effective_rule("similar:0.5") == "similar" and similar_threshold("similar:0.5") == 0.5
    assert similar_threshold("similar") is None and similar_threshold("auto") is None
    for bad in ("similar:1", "similar:0", "similar:x", "similar:-0.3", "similar:nan"):
        with pytest.raises(ValueError, match="threshold in"):
            parse_group_by(bad)


def test_similar_groups_travel_with_the_task_and_untagged_tasks_form_the_not_grouped_group() -> None:
    from backend.grouping import SIMILAR_KEY, tag_similar

    tasks = [TaskRef(i, {"image": f"{i}.png", SIMILAR_KEY: "forged"}) for i in (1, 2, 3)]
    tagged = tag_similar(tasks, {1: "s1", 3: "s2"})
    assert group_key(tagged[0].data, "similar") == GroupKey("similar", "s1")
    assert group_key(tagged[1].data, "similar") == GroupKey("similar", None)  # a forged value is dropped
    assert [t.id for t in members(tagged, GroupKey("similar", "s2"))] == [3]
    assert group_key(tagged[0].data, "similar:0.6") == GroupKey("similar", "s1")  # one rule, any threshold


def test_a_similar_threshold_survives_being_saved_and_read_again() -> None:
    from backend.grouping import effective_rule, similar_threshold
    from backend.rules import parse_group_by

    for text in ("similar:0.9999999", "similar:0.1234567891", "similar:1e-7", "similar:0.5"):
        once = parse_group_by(text)
        assert parse_group_by(once) == once and effective_rule(once) == "similar"
        assert similar_threshold(once) == float(text.split(":")[1])


def test_a_regex_that_backtracks_forever_is_stopped_and_matches_nothing() -> None:
    import time

    rule = "filename:^(a|aa)+$"
    t0 = time.perf_counter()
    key = group_key({"image": "/data/upload/1/" + "a" * 200 + "!.png"}, rule)
    assert key == GroupKey(rule, None) and time.perf_counter() - t0 < 1.0
    assert group_key({"image": "aaaa"}, rule) == GroupKey(rule, "a")


def test_groups_of_buckets_each_task_once() -> None:
    from backend.grouping import groups_of

    got = groups_of(TASKS + [TaskRef(1, {"image": "x.png", "group": "dogs"})], "auto")
    assert {k.value: [t.id for t in v] for k, v in got.items()} == {
        "cats": [1, 3],
        "dogs": [2],
        None: [4, 5, 6],
    }
