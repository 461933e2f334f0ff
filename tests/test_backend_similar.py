"""backend.grouping.similar and backend.prediction.similar: grouping by the images' own features.

Known answers: descriptors built around planted directions (one per object) must come back as one group per
direction, whatever the noise; later tasks join the right group; the stored groups survive a new process;
processes assigning at once agree.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.grouping.similar import Cluster, SimilarGroups, assign

DIM = 32


def planted(
    n_per: list[int], *, seed: int = 0, noise: float = 0.3
) -> tuple[list[tuple[int, np.ndarray]], dict]:
    """Descriptors of ``len(n_per)`` objects (orthogonal directions), ``n_per[k]`` images each, interleaved
    by task id; returns the pairs and task id -> object."""
    rng = np.random.default_rng(seed)
    pairs, truth, tid = [], {}, 1
    queue = [k for k, n in enumerate(n_per) for _ in range(n)]
    rng.shuffle(queue)
    for k in queue:
        v = np.zeros(DIM)
        v[k] = 1.0
        v = v + noise * rng.standard_normal(DIM) / np.sqrt(DIM)
        pairs.append((tid, v))
        truth[tid] = k
        tid += 1
    return pairs, truth


def same_partition(got: dict[int, int], truth: dict[int, int]) -> bool:
    return len({(got[t], truth[t]) for t in truth}) == len(set(truth.values())) == len(set(got.values()))


def test_planted_objects_come_back_as_groups() -> None:
    pairs, truth = planted([6, 5, 7])
    clusters: dict[int, Cluster] = {}
    got = assign(clusters, pairs, threshold=0.6, min_size=2, max_size=64)
    assert same_partition(got, truth)
    assert sorted(c.n for c in clusters.values()) == [5, 6, 7]


def test_assignment_is_deterministic_and_in_id_order() -> None:
    pairs, _ = planted([4, 4], seed=3)
    a = assign({}, pairs, threshold=0.6, min_size=1, max_size=64)
    b = assign({}, list(reversed(pairs)), threshold=0.6, min_size=1, max_size=64)
    assert a == b
    assert a[1] == 1  # the first task by id starts group 1


def test_later_tasks_join_their_group_or_start_a_new_one_and_ids_stay() -> None:
    pairs, truth = planted([5, 5, 4], seed=1)
    first = [p for p in pairs if truth[p[0]] in (0, 1)]
    later = [p for p in pairs if truth[p[0]] == 2] + [(100, first[0][1] * 1.0), (101, first[-1][1] * 1.0)]
    clusters: dict[int, Cluster] = {}
    before = assign(clusters, first, threshold=0.6, min_size=2, max_size=64)
    after = assign(clusters, later, threshold=0.6, min_size=2, max_size=64)
    assert set(before.values()) == {1, 2}
    assert {after[t] for t, _ in later if t < 100} == {3}  # the new object: a new group, the next id
    assert after[100] == before[first[0][0]] and after[101] == before[first[-1][0]]


def test_a_lone_image_joins_the_nearest_group_unless_min_size_is_one() -> None:
    pairs, truth = planted([4, 4], seed=2)
    odd = np.zeros(DIM)
    odd[0], odd[5] = 0.5, 1.0  # its own object, nearer object 0 than object 1
    with_odd = pairs + [(50, odd)]
    got = assign({}, with_odd, threshold=0.6, min_size=2, max_size=64)
    zero = got[next(t for t, k in truth.items() if k == 0)]
    assert got[50] == zero and len(set(got.values())) == 2
    alone = assign({}, with_odd, threshold=0.6, min_size=1, max_size=64)
    assert len(set(alone.values())) == 3


def test_groups_never_exceed_max_size() -> None:
    pairs, _ = planted([10], seed=4)
    clusters: dict[int, Cluster] = {}
    got = assign(clusters, pairs, threshold=0.6, min_size=2, max_size=4)
    assert sorted(c.n for c in clusters.values()) == [2, 4, 4]
    assert len(got) == 10


def test_bad_parameters_and_mixed_widths_are_refused() -> None:
    with pytest.raises(ValueError, match="threshold"):
        assign({}, [], threshold=1.0, min_size=1, max_size=2)
    with pytest.raises(ValueError, match="min_size"):
        assign({}, [], threshold=0.5, min_size=3, max_size=2)
    with pytest.raises(ValueError, match="widths"):
        assign({1: Cluster(np.ones(4), 1)}, [(1, np.ones(8))], threshold=0.5, min_size=1, max_size=2)


def test_a_non_finite_descriptor_matches_nothing() -> None:
    pairs, _ = planted([3], seed=5)
    bad = np.full(DIM, np.nan)
    got = assign({}, pairs + [(99, bad)], threshold=0.6, min_size=1, max_size=64)
    assert got[99] != got[pairs[0][0]]


def test_the_store_keeps_groups_across_processes_and_never_reassigns(tmp_path: Path) -> None:
    pairs, truth = planted([3, 3], seed=6)
    first = SimilarGroups(tmp_path).assign(7, dict(pairs[:4]), threshold=0.6, min_size=1, max_size=64)
    assert (tmp_path / "groups.sqlite3").is_file()
    again = SimilarGroups(tmp_path)  # a new process would open the same file
    everything = again.assign(7, dict(pairs), threshold=0.6, min_size=1, max_size=64)
    assert {t: everything[t] for t in first} == first
    assert same_partition({t: int(g[1:]) for t, g in everything.items()}, truth)
    # a second assignment of known tasks, even with other descriptors, changes nothing
    flipped = {t: -v for t, v in pairs}
    assert again.assign(7, flipped, threshold=0.6, min_size=1, max_size=64) == everything
    assert again.lookup(8) == {} and again.lookup(7, [pairs[0][0]]) == {pairs[0][0]: everything[pairs[0][0]]}


def _assign_in_process(args: tuple[str, int]) -> dict[int, str]:
    root, seed = args
    pairs, _ = planted([6, 6], seed=11)
    rng = np.random.default_rng(seed)
    part = [pairs[i] for i in sorted(rng.choice(len(pairs), size=8, replace=False))]  # overlapping subsets
    return SimilarGroups(root).assign(3, dict(part), threshold=0.6, min_size=1, max_size=64)


def test_processes_assigning_at_once_agree(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_assign_in_process, [(str(tmp_path), s) for s in range(4)])
    final = SimilarGroups(tmp_path).lookup(3)
    assert all(r == {t: final[t] for t in r} for r in results)  # nobody saw another group for a task
    _, truth = planted([6, 6], seed=11)
    assert same_partition({t: int(g[1:]) for t, g in final.items()}, {t: truth[t] for t in final})


def test_a_new_feature_space_starts_new_groups_and_keeps_the_old_ones(tmp_path: Path) -> None:
    store = SimilarGroups(tmp_path)
    pairs, _ = planted([3, 3], seed=12)
    before = store.assign(5, dict(pairs), space="dino", threshold=0.6, min_size=1, max_size=64)
    wide = {100: np.ones(DIM * 2), 101: np.ones(DIM * 2)}  # another backbone: another width
    after = store.assign(5, wide, space="dinov2", threshold=0.6, min_size=1, max_size=64)
    assert {t: after[t] for t in before} == before
    assert after[100] == after[101] and after[100] not in set(before.values())


def test_grouping_for_one_answer_stores_nothing(tmp_path: Path) -> None:
    store = SimilarGroups(tmp_path)
    pairs, _ = planted([2, 2], seed=13)
    out = store.assign(6, dict(pairs), threshold=0.6, min_size=1, max_size=64, persist=False)
    assert len(out) == 4 and store.lookup(6) == {}


class _Feats:
    def __init__(self, tokens: torch.Tensor, attention: torch.Tensor):
        self.tokens, self.cls_attention = tokens, attention


class _Pipeline:
    """``encode`` gives each image tokens that say its colour where the CLS attention is high, and random
    tokens elsewhere: the descriptor must follow the attended colour."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, images: list[np.ndarray], hashes: list[str]) -> _Feats:
        self.calls += 1
        n, rng = len(images), torch.Generator().manual_seed(0)
        tokens = torch.randn(n, 4, 4, 8, generator=rng)
        attention = torch.zeros(n, 4, 4)
        attention[:, 1:3, 1:3] = 1.0
        for i, img in enumerate(images):
            colour = torch.tensor(img[0, 0, :3], dtype=torch.float32) / 255.0
            tokens[i, 1:3, 1:3, :3] = colour * 10
            tokens[i, 1:3, 1:3, 3:] = 0
        return _Feats(tokens, attention)


def test_descriptors_follow_what_the_attention_looks_at() -> None:
    from backend.prediction.similar import descriptors

    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((8, 8, 3), np.uint8)
    blue[..., 2] = 255
    d = descriptors(_Pipeline(), [red, red.copy(), blue])
    assert d.shape == (3, 8) and d.dtype == np.float32
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    assert d[0] @ d[1] > 0.99 and d[0] @ d[2] < 0.5


def test_a_webhooks_task_is_filed_under_its_stored_group(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from backend.grouping import SIMILAR_KEY, GroupKey, group_key
    from backend.prediction.similar import SimilarGrouper
    from backend.settings import Settings

    grouper = SimilarGrouper(Settings.from_env({"MODEL_DIR": str(tmp_path)}), ls=None)  # type: ignore[arg-type]
    pairs, _ = planted([2, 2], seed=8)
    stored = grouper.store.assign(4, dict(pairs), threshold=0.6, min_size=1, max_size=64)
    project = SimpleNamespace(id=4, group_by="similar:0.6")
    payload = {"task": {"id": 3, "data": {"image": "x.png", SIMILAR_KEY: "forged"}}, "annotation": {"id": 1}}
    tagged = grouper.tag_event(project, payload)  # type: ignore[arg-type]
    assert group_key(tagged["task"]["data"], "similar") == GroupKey("similar", stored[3])
    assert payload["task"]["data"][SIMILAR_KEY] == "forged"  # the caller's payload is not changed
    unknown = grouper.tag_event(project, {"task": {"id": 77, "data": {"image": "y.png"}}})  # type: ignore[arg-type]
    assert group_key(unknown["task"]["data"], "similar") == GroupKey("similar", None)
    other = SimpleNamespace(id=4, group_by="auto")
    assert grouper.tag_event(other, payload) is payload  # type: ignore[arg-type]
