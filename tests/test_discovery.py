"""TokenCut / MaskCut on planted patch features: known masks, the two flip rules, nearest upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cosod.discovery import maskcut, ncut_bipartition, second_smallest_eigenvector, upsample_mask

C = 32
H = W = 16


def _basis(seed: int = 0) -> np.ndarray:
    """Three orthonormal C-vectors (rows): background, object A, object B."""
    rng = np.random.default_rng(seed)
    return np.linalg.qr(rng.standard_normal((C, 3)))[0].T


def _paint(regions: list[np.ndarray], noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """(H, W, C) features: background vector everywhere, region i gets vector i + 1, plus Gaussian noise."""
    basis = _basis(seed)
    feats = np.tile(basis[0], (H, W, 1))
    for i, region in enumerate(regions):
        feats[region] = basis[i + 1]
    return feats + noise * np.random.default_rng(seed + 1).standard_normal(feats.shape)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _blocks() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((H, W), dtype=bool)
    a[2:7, 3:9] = True
    b = np.zeros((H, W), dtype=bool)
    b[9:14, 8:14] = True
    return a, b


def test_maskcut_finds_the_planted_instances():
    a, b = _blocks()
    feats = _paint([a, b])
    masks = maskcut(feats, n_masks=3, tau=0.15)
    assert len(masks) == 2  # the third cut is emptied (overlap/area rule) and dropped
    assert all(m.dtype == bool and m.shape == (H, W) for m in masks)
    assert not (masks[0] & masks[1]).any()
    best = sorted(max(_iou(m, a), _iou(m, b)) for m in masks)
    assert best == [1.0, 1.0]
    assert {_iou(masks[0], a) == 1.0, _iou(masks[1], a) == 1.0} == {True, False}
    # same answer from a float32 tensor; keep_empty keeps every cut
    from_tensor = maskcut(torch.from_numpy(feats).float(), n_masks=3, tau=0.15, keep_empty=True)
    assert len(from_tensor) == 3 and not from_tensor[2].any()
    assert all(np.array_equal(x, y) for x, y in zip(masks, from_tensor[:2], strict=True))


def test_ncut_single_object_and_its_eigenvector():
    a, _ = _blocks()
    feats = _paint([a])
    cut = ncut_bipartition(feats.reshape(-1, C), (H, W), tau=0.2)
    assert np.array_equal(cut.mask, a)
    assert cut.mask[cut.seed] and cut.eigvec[cut.seed] > cut.eigvec.mean()
    assert cut.eigvec.shape == (H, W) and cut.eigvec.dtype == np.float64
    # the eigenvector itself separates the two cliques (not just after taking the seed's component)
    assert cut.eigvec[a].min() > cut.eigvec[~a].max()


def test_corner_rule_separates_maskcut_from_tokencut():
    """A one-patch background frame around a 14x14 object: the frame is the smaller side and holds the seed.
    TokenCut keeps the frame; MaskCut sees all four corners in it and takes the object instead."""
    obj = np.zeros((H, W), dtype=bool)
    obj[1:-1, 1:-1] = True
    feats = _paint([obj])
    frame = ~obj
    assert np.array_equal(ncut_bipartition(feats).mask, frame)
    masks = maskcut(feats, n_masks=2, tau=0.15)
    assert np.array_equal(masks[0], obj)


def test_painted_patches_have_only_eps_edges():
    feats = np.zeros((6, 4))
    feats[:3, 0] = 1.0
    feats[3:, 1] = 1.0
    v = second_smallest_eigenvector(feats, tau=0.2)
    assert np.all(np.sign(v[:3]) == np.sign(v[0])) and np.all(np.sign(v[3:]) == -np.sign(v[0]))
    feats[3:] = 0.0  # painted: no edge above tau, yet the problem stays well posed
    assert np.isfinite(second_smallest_eigenvector(feats, tau=0.2)).all()


def test_upsample_mask_matches_torch_nearest():
    rng = np.random.default_rng(2)
    for shape, size in (((3, 5), (7, 11)), ((60, 60), (480, 480)), ((4, 4), (3, 2))):
        mask = rng.random(shape) > 0.5
        ref = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")[
            0, 0
        ].bool()
        out = upsample_mask(mask, size)
        assert out.dtype == bool and np.array_equal(out, ref.numpy())


def test_inputs_are_validated():
    feats = np.zeros((4, 4, 8))
    with pytest.raises(ValueError, match="grid"):
        ncut_bipartition(feats.reshape(16, 8), (3, 5))
    with pytest.raises(ValueError, match="grid"):
        ncut_bipartition(feats.reshape(16, 8))
    with pytest.raises(ValueError, match="n_masks"):
        maskcut(feats, n_masks=0)
    with pytest.raises(ValueError, match="tau"):
        maskcut(feats, tau=1.5)
    with pytest.raises(ValueError, match=r"\(h, w, C\)"):
        maskcut(feats.reshape(16, 8))
    with pytest.raises(ValueError, match="size"):
        upsample_mask(np.ones((2, 2), bool), (0, 4))
