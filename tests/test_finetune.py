"""cosod.finetune: the split, the targets, the promotion rule, and training on synthetic groups (tiny
backbones, whose masks are the truth)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from cosod import finetune as ft
from cosod.backbones import build_backbone
from cosod.data import synthetic_group
from cosod.features import image_hash
from cosod.pipeline import Pipeline, PipelineConfig
from cosod.ums.checkpoint import UMSCheckpoint
from cosod.ums.net import UMSNet


def _hashes(n: int, salt: str = "") -> list[str]:
    return [hashlib.sha256(f"{salt}{i}".encode()).hexdigest() for i in range(n)]


def test_split_is_deterministic_about_a_fifth_and_stable_as_data_grows() -> None:
    hs = _hashes(500)
    train, held = ft.split_heldout(hs, 0.2)
    assert sorted(train + held) == sorted(hs) and not set(train) & set(held)
    assert 0.15 < len(held) / len(hs) < 0.25
    assert ft.split_heldout(list(reversed(hs)), 0.2) == (train, held)
    _, held_more = ft.split_heldout(hs + _hashes(200, "x"), 0.2)
    assert set(held) <= set(held_more)  # an image never changes sides
    assert ft.split_heldout(hs[:1], 0.2) == (hs[:1], [])
    small_train, small_held = ft.split_heldout(hs[:2], 0.2)
    assert len(small_held) == 1 and len(small_train) == 1


def test_mask_to_grid_is_the_cell_fraction() -> None:
    m = np.zeros((16, 32), bool)
    m[:8, :8] = True  # exactly cell (0, 0) of the 2x4 grid (cells are 8x8 pixels)
    m[8:, 28:] = True  # half of cell (1, 3)
    grid = ft.mask_to_grid(m, (2, 4))
    assert torch.allclose(grid, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0.5]]))
    sq = ft.mask_to_square(m, 4)
    assert sq.shape == (4, 4) and sq[0, 0] == 1 and sq[3, 0] == 0


def test_config_and_group_validation() -> None:
    with pytest.raises(ValueError, match="1.5"):
        ft.FinetuneConfig(heldout_fraction=1.5)
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="its image's size"):
        ft.FinetuneGroup("g", [img], ["h"], [np.zeros((4, 4), bool)])


def test_supervised_terms_known_values() -> None:
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    perfect = target.clamp(1e-6, 1 - 1e-6)
    bce, iou = ft.supervised_terms(perfect, target)
    assert float(bce) < 1e-4 and float(iou) < 1e-4
    _, iou_half = ft.supervised_terms(torch.full((1, 2, 2), 0.5), target)
    assert float(iou_half) == pytest.approx(1 - 1.0 / 3.0, abs=1e-4)  # 1 / (2 + 2 - 1)


def _groups(n_groups: int, n_images: int, corrected_every: int = 1) -> list[ft.FinetuneGroup]:
    out = []
    for g in range(n_groups):
        imgs, masks = synthetic_group(n_images, size=(64, 80), seed=10 + g)
        kept = [m if k % corrected_every == 0 else None for k, m in enumerate(masks)]
        out.append(ft.FinetuneGroup(f"g{g}", imgs, [image_hash(i) for i in imgs], kept))
    return out


@pytest.mark.slow
def test_stage1_finetune_fits_the_corrections_and_leaves_the_active_head_alone(
    tiny_pipeline: Pipeline,
) -> None:
    groups = _groups(2, 6, corrected_every=2)
    before = {k: v.clone() for k, v in tiny_pipeline.stage1.state_dict().items()}
    seen: list[float] = []
    res = ft.finetune(
        tiny_pipeline,
        groups,
        ft.FinetuneConfig(steps=60, lr=3e-3),
        on_step=lambda s, r: seen.append(r["bce"] + r["iou_loss"]),
    )
    assert len(seen) == 60
    print(f"supervised loss {np.mean(seen[:5]):.3f} -> {np.mean(seen[-5:]):.3f}")
    assert np.mean(seen[-5:]) < 0.9 * np.mean(seen[:5])
    for k, v in tiny_pipeline.stage1.state_dict().items():
        assert torch.equal(v, before[k])
    corrected = [h for g in groups for h, m in zip(g.hashes, g.masks, strict=True) if m is not None]
    assert sorted(res.train_hashes + res.heldout_hashes) == sorted(corrected)
    cand = ft.head_pipeline(tiny_pipeline, res.head)
    assert cand.backbone is tiny_pipeline.backbone and cand.version_id != tiny_pipeline.version_id
    scores = ft.evaluate_heldout(cand, groups, set(res.heldout_hashes))
    assert scores["n_images"] == len(res.heldout_hashes) and 0.0 <= scores["iou"] <= 1.0


def test_evaluate_heldout_scores_the_truth_as_perfect(tiny_pipeline: Pipeline) -> None:
    class Oracle:
        """Answers each group with its true masks, to pin the scoring path."""

        def __init__(self, truth: dict[str, np.ndarray]):
            self.truth = truth

        def predict_group(self, images, *, hashes):  # noqa: ANN001, ANN201
            from cosod.pipeline import GroupPrediction

            return GroupPrediction(masks=[self.truth[h] for h in hashes])

    groups = _groups(2, 4)
    truth = {h: m for g in groups for h, m in zip(g.hashes, g.masks, strict=True)}
    held = set(list(truth)[:3])
    s = ft.evaluate_heldout(Oracle(truth), groups, held)  # type: ignore[arg-type]
    assert s["n_images"] == 3 and s["iou"] == 1.0 and s["mae"] == 0.0
    wrong = ft.evaluate_heldout(Oracle({h: ~m for h, m in truth.items()}), groups, held)  # type: ignore[arg-type]
    assert wrong["iou"] == 0.0 and wrong["mae"] == 1.0
    assert ft.evaluate_heldout(Oracle(truth), groups, set()) == {"n_images": 0}  # type: ignore[arg-type]
    # per image, keyed (group, image hash): the one image answered wrong scores 0, the others 1
    miss = sorted(held)[0]
    half = {h: (~m if h == miss else m) for h, m in truth.items()}
    scored = ft.score_heldout(Oracle(half), groups, held)  # type: ignore[arg-type]
    where = {h: g.name for g in groups for h in g.hashes}
    assert scored.metric("iou") == {(where[h], h): 0.0 if h == miss else 1.0 for h in held}
    assert scored.summary["iou"] == pytest.approx(2 / 3) and scored.summary["n_images"] == 3
    assert ft.score_heldout(Oracle(truth), groups, set()).per_image == {}  # type: ignore[arg-type]


@pytest.mark.slow
def test_ums_finetune_uses_corrections_and_pseudo_labels() -> None:
    cfg = PipelineConfig(model="ums", input_size=112, max_refs=4, crf=False)
    dino = build_backbone("tiny", input_size=112)
    v2 = build_backbone("tiny_dinov2", input_size=112)
    net = UMSNet.build(seed=0, dim=dino.embed_dim, v2_dim=v2.embed_dim, width=8)
    ckpt = UMSCheckpoint(net=net, backbone="tiny", v2_backbone="tiny_dinov2", bm_bar=0.4)
    active = Pipeline(cfg, dino, None, None, ums=ckpt, v2_backbone=v2)
    groups = _groups(2, 5, corrected_every=2)
    seen: list[float] = []
    res = ft.finetune(
        active, groups, ft.FinetuneConfig(steps=12, lr=3e-3), on_step=lambda s, r: seen.append(r["loss"])
    )
    assert isinstance(res.head, UMSCheckpoint) and res.head.net is not net
    assert 0.0 < res.head.bm_bar < 1.0 and res.train_metrics["steps"] == 12
    assert len(seen) == 12 and np.isfinite(seen).all()
    cand = ft.head_pipeline(active, res.head)
    assert cand.threshold == "map" and cand.bm_bar == res.head.bm_bar
    assert len(cand.predict_group(groups[0].images, hashes=groups[0].hashes)) == 5
