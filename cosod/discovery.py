"""Training-free object discovery on ViT keys: TokenCut's normalised cut and MaskCut (method_spec B.2.1).

Both work on one image's last-block DINO keys at patch resolution and return boolean masks on the patch grid;
:func:`upsample_mask` brings a mask to pixels (nearest). CRF post-processing is done elsewhere.

Normalised cut (TokenCut):
    1. L2-normalise the patch features; A = F F^T (cosine), then A := 1 where A > tau, else eps.
    2. D = diag(rowsum A); second-smallest generalised eigenvector v of (D - A) v = lambda D v.
    3. Foreground = v > mean(v); seed = argmax |v|; flip v and the partition if the seed is in the background.
    4. Keep the 4-connected component containing the seed.

MaskCut (CutLER) repeats the cut up to N times: before each later cut the features of every patch covered by
an earlier mask are set to zero (zero vectors have cosine 0 < tau with everything, so only eps edges); the
flip rule becomes "flip if >= 3 of the 4 corner patches are foreground, else flip iff the seed is background",
and the seed is then argmax of the (possibly flipped) v. CutLER applies that rule to the eigenvector with
whatever sign the eigensolver returned, so when the seed's side touches >= 3 corners its result depends on
that sign (the corner rule fires only if the solver happened to put the seed's side above the mean). Here the
sign is first made positive at argmax |v|, so the rule always reads "take the seed's side, unless it touches
>= 3 corners, then the other side": CutLER's result for one of the two signs, and the one its corner rule
intends. A mask is emptied when its IoU with the previous iteration's mask exceeds 0.5 or it covers <= 1 % of
the grid, and every mask has the union of the earlier ones removed.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage
from scipy.linalg import eigh

from .metrics import iou

log = logging.getLogger(__name__)

TOKENCUT_TAU = 0.2
MASKCUT_TAU = 0.15
MASKCUT_N = 3
EPS = 1e-5
MAX_OVERLAP = 0.5
MIN_AREA_RATIO = 0.01


class Bipartition(NamedTuple):
    """mask: bool (h, w), the seed's component; eigvec: float64 (h, w), the (possibly flipped) second-smallest
    generalised eigenvector; seed: (row, col) of the seed patch."""

    mask: np.ndarray
    eigvec: np.ndarray
    seed: tuple[int, int]


def _as_features(
    keys: np.ndarray | torch.Tensor, grid: tuple[int, int] | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """(N, C) with grid, or (h, w, C) -> float64 (N, C) and (h, w)."""
    if isinstance(keys, torch.Tensor):
        keys = keys.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(keys, dtype=np.float64)
    if x.ndim == 3:
        if grid is not None and tuple(grid) != x.shape[:2]:
            raise ValueError(f"grid {tuple(grid)} does not match keys of shape {x.shape}")
        grid = (x.shape[0], x.shape[1])
        x = x.reshape(-1, x.shape[2])
    if x.ndim != 2:
        raise ValueError(f"keys must be (N, C) or (h, w, C), got shape {x.shape}")
    if grid is None:
        raise ValueError("grid (h, w) is required when keys are (N, C)")
    h, w = int(grid[0]), int(grid[1])
    if h < 1 or w < 1 or h * w != x.shape[0]:
        raise ValueError(f"grid {tuple(grid)} does not hold {x.shape[0]} patches")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 patches for a cut, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("keys contain NaN or inf")
    return x, (h, w)


def _check_params(tau: float, eps: float) -> None:
    if not -1.0 <= tau < 1.0:
        raise ValueError(f"tau must lie in [-1, 1), got {tau}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def second_smallest_eigenvector(feats: np.ndarray, tau: float, eps: float = EPS) -> np.ndarray:
    """Binary cosine graph of float (N, C) features -> second-smallest generalised eigenvector, float64 (N,).

    Zero feature vectors stay zero after normalisation (cosine 0 with everything).
    """
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    f = feats / np.maximum(norms, 1e-12)
    a = np.where(f @ f.T > tau, 1.0, eps)
    d = np.diag(a.sum(axis=1))
    _, vecs = eigh(d - a, d, subset_by_index=[1, 1])
    return vecs[:, 0]


def _component(fg: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of bool ``fg`` (h, w) holding ``seed``; empty if the seed is background."""
    labels, _ = ndimage.label(fg)
    lab = labels[seed]
    if lab == 0:
        return np.zeros_like(fg, dtype=bool)
    return labels == lab


def ncut_bipartition(
    keys: np.ndarray | torch.Tensor,
    grid: tuple[int, int] | None = None,
    tau: float = TOKENCUT_TAU,
    eps: float = EPS,
) -> Bipartition:
    """TokenCut on one image: keys (N, C) with ``grid`` = (h, w), or (h, w, C) -> :class:`Bipartition`.

    Args:
        keys: patch features (any float dtype; numpy array or tensor), normally DINO last-block keys.
        grid: (h, w) with h * w = N; inferred from 3-D keys.
        tau: affinity threshold on the cosine (0.2 in TokenCut).
        eps: weight of the edges below tau.
    """
    _check_params(tau, eps)
    x, (h, w) = _as_features(keys, grid)
    v = second_smallest_eigenvector(x, tau, eps)
    fg = v > v.mean()
    seed_idx = int(np.argmax(np.abs(v)))
    if not fg[seed_idx]:
        v = -v
        fg = ~fg
    seed = (seed_idx // w, seed_idx % w)
    mask = _component(fg.reshape(h, w), seed)
    return Bipartition(mask=mask, eigvec=v.reshape(h, w), seed=seed)


def _corner_count(fg: np.ndarray) -> int:
    return int(fg[0, 0]) + int(fg[0, -1]) + int(fg[-1, 0]) + int(fg[-1, -1])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; 0 when both are empty (:func:`cosod.metrics.iou`)."""
    return iou(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool), empty=0.0)


def maskcut(
    keys: np.ndarray | torch.Tensor,
    n_masks: int = MASKCUT_N,
    tau: float = MASKCUT_TAU,
    eps: float = EPS,
    keep_empty: bool = False,
) -> list[np.ndarray]:
    """MaskCut on one image: keys (h, w, C) -> up to ``n_masks`` disjoint bool (h, w) masks, in cut order.

    Args:
        keys: patch features (h, w, C), numpy or tensor (DINO ViT-B/8 last-block keys at 480 -> 60x60 in
            CutLER).
        n_masks: number of cuts N (3).
        tau: affinity threshold (0.15 as in the CutLER README; its script default is 0.2).
        eps: weight of the edges below tau.
        keep_empty: keep the masks emptied by the overlap/area rule (always ``n_masks`` items) instead of
            dropping them.
    """
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    _check_params(tau, eps)
    shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else np.shape(keys)
    if len(shape) != 3:
        raise ValueError(f"keys must be (h, w, C), got shape {shape}")
    x, (h, w) = _as_features(keys, None)
    painted = np.zeros((h, w), dtype=bool)
    accumulated = np.zeros((h, w), dtype=bool)
    previous: np.ndarray | None = None
    masks: list[np.ndarray] = []
    for t in range(n_masks):
        if previous is not None:
            painted |= previous
            x = np.where(painted.reshape(-1, 1), 0.0, x)
        v = second_smallest_eigenvector(x, tau, eps)
        v = v * np.sign(
            v[np.argmax(np.abs(v))]
        )  # canonical sign: positive at the seed (LAPACK's is arbitrary)
        fg = (v > v.mean()).reshape(h, w)
        seed_idx = int(np.argmax(np.abs(v)))
        if _corner_count(fg) >= 3 or not fg.flat[seed_idx]:
            v = -v
            fg = ~fg
        seed_idx = int(np.argmax(v))
        candidate = _component(fg, (seed_idx // w, seed_idx % w))
        if t >= 1:
            ratio = candidate.sum() / candidate.size
            overlap = _iou(previous, candidate) if previous is not None else 0.0
            if overlap > MAX_OVERLAP or ratio <= MIN_AREA_RATIO:
                log.debug(
                    "maskcut: cut %d discarded (IoU with previous %.3f, area ratio %.4f)", t, overlap, ratio
                )
                candidate = np.zeros_like(candidate)
        previous = candidate
        mask = candidate & ~accumulated
        accumulated |= mask
        if mask.any() or keep_empty:
            masks.append(mask)
    return masks


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool (h, w) mask to bool (H, W): output pixel (i, j) takes patch
    (floor(i h / H), floor(j w / W)), as ``torch.nn.functional.interpolate(mode="nearest")`` does."""
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D array, got shape {m.shape}")
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {tuple(size)}")
    rows = (np.arange(out_h) * m.shape[0]) // out_h
    cols = (np.arange(out_w) * m.shape[1]) // out_w
    return m.astype(bool)[np.ix_(rows, cols)]
