"""cosod.loop: the one epoch loop's order of groups, subsets and steps, pinned against numpy's generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cosod.backbones import BackboneFeatures
from cosod.loop import adam, run_epochs
from cosod.methods import Batch

SIZES = [3, 1, 30, 2]  # group 1 is too small to train on


def _batch(group: int, n: int) -> Batch:
    """Image i of group g carries the id 100 g + i in its tokens, so a step can tell what it was given."""
    ids = torch.tensor([100.0 * group + i for i in range(n)]).reshape(n, 1, 1, 1)
    return Batch((BackboneFeatures(ids, ids.clone(), torch.zeros(n, 1, 1)),))


def _run(**kw):  # noqa: ANN003, ANN202
    seen: list[list[int]] = []
    module = nn.Linear(1, 1)

    def step(batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch.feats[0].tokens.flatten()
        seen.append([int(x) for x in ids])
        loss = (module(ids[:, None]) ** 2).mean()
        return loss, {"loss": float(loss.detach()), "n": float(len(ids))}

    batches = [_batch(g, n) for g, n in enumerate(SIZES)]
    hist = run_epochs(module, adam(module, 1e-2, 0.0, (0.9, 0.999)), batches.__getitem__, 4, step, **kw)
    return seen, hist, module


def _expected(seed: int, epochs: int, max_group: int, reverse: bool = False) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(len(SIZES))
        for g in order[::-1] if reverse else order:
            n = SIZES[g]
            if n < 2:
                continue
            pick = np.sort(rng.choice(n, size=min(n, max_group), replace=False))
            out.append([100 * int(g) + int(i) for i in pick])
    return out


def test_groups_and_subsets_follow_the_seeded_generator() -> None:
    seen, hist, module = _run(seed=7, max_group=4, epochs=3, max_steps=None)
    assert seen == _expected(7, 3, 4)
    assert hist.steps == 9 and len(hist.records) == 9 and len(hist.epochs) == 3
    assert hist.epochs[0]["n"] == pytest.approx(np.mean([len(s) for s in seen[:3]]))
    assert (
        hist.metrics()["epoch_loss"] == hist.epoch_means("loss")
        and hist.metrics()["last"] == hist.records[-1]
    )
    assert not module.training  # eval mode afterwards


def test_reverse_walks_each_permutation_from_its_end_and_max_steps_stops_mid_epoch() -> None:
    seen, hist, _ = _run(seed=3, max_group=24, epochs=None, max_steps=5, reverse=True)
    assert seen == _expected(3, 2, 24, reverse=True)[:5]
    assert hist.steps == 5 and len(hist.epochs) == 2  # 3 steps, then 2 of the next epoch
    tail = hist.tail_mean(2)
    assert tail["loss"] == pytest.approx(np.mean([r["loss"] for r in hist.records[-2:]]))


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="epochs or max_steps"):
        _run(seed=0, max_group=4, epochs=None, max_steps=None)
    module = nn.Linear(1, 1)
    tiny = [_batch(0, 1)]
    with pytest.raises(ValueError, match="no group has 2 or more images"):
        run_epochs(
            module,
            adam(module, 1e-2, 0.0, (0.9, 0.999)),
            tiny.__getitem__,
            1,
            lambda b: (module.weight.sum(), {"loss": 0.0}),
            seed=0,
            max_group=4,
            epochs=None,
            max_steps=3,
        )
