"""From soft co-attention maps to masks: adaptive threshold, region-level refinement, dense CRF.

Shared by the SCoSPARC and UMS paths (method_spec A.5-A.7 and B.9):

- :func:`group_threshold` is SCoSPARC's code form: one threshold for the whole group from the mean confidence
  of the pixels >= 0.15 at the token grid, ``th = th0 + alpha_c * ((1 - conf) - B_bar)``.
- :func:`map_thresholds` is the per-map form of the UMS paper: conf = mean of the pixels >= the map mean.
- :func:`refine_regions` keeps the 8-connected components whose pooled tokens resemble the group prototype
  (integer-percent cosine, relative to the best component, kept at >= 0.77).
- :func:`dense_crf` is the hard-label DenseCRF of the official code; :func:`crf_refine` and
  :func:`output_map` run it and write the mask the official way (224x224 squash, OpenCV ``INTER_LINEAR``);
  :func:`crf_refine_group` runs a group's CRFs side by side in worker processes (:mod:`cosod.densecrf`).

Faithful by default; each deliberate difference is a named option, off by default:

- ``fallback="best"`` (:func:`refine_regions`): when no component scores above zero, keep only the best one
  (method_spec A.6's proposal). Official: the ratio rule as written, ``s_k / max s_k >= 0.77``, which keeps
  every component when the best score is negative; a best score of exactly 0 divides by zero in the official
  code and leaves a stale mask, so here every component is kept then (documented fix, not an option).
- ``aspect="keep"`` (:func:`crf_refine`): CRF at a size that keeps the aspect ratio (long side 224, PIL
  bilinear with antialiasing, pairwise ``sxy`` scaled) instead of the official 224x224 squash.
- ``uniform="keep"`` (:func:`crf_refine`): a CRF result that is foreground everywhere stays so; the official
  min-max normalisation divides by zero there and writes an all-zero mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.Image import Resampling
from skimage.measure import label as connected_components

from .densecrf import CRF_REFERENCE_SIDE, OFFICIAL_CRF, CRFParams, dense_crf, run_crfs, working_size

__all__ = [  # the CRF lives in .densecrf (light, for its worker processes); these names stay importable here
    "CRF_REFERENCE_SIDE",
    "OFFICIAL_CRF",
    "CRFParams",
    "dense_crf",
    "run_crfs",
    "working_size",
]

log = logging.getLogger(__name__)

TH0 = 0.505
ALPHA_C = 1.0
BM_BAR = 0.48
CONF_FLOOR = 0.15
BOX_SIM = 0.77


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear with align_corners=True as the official code resizes maps."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=True)[:, 0]


def group_threshold(
    maps_work: torch.Tensor,
    grid: tuple[int, int],
    *,
    th0: float = TH0,
    alpha_c: float = ALPHA_C,
    bm_bar: float = BM_BAR,
    floor: float = CONF_FLOOR,
) -> float:
    """One threshold for a group from its working-size maps (B, S, S) in [0, 1].

    Each map is resized (bilinear, align_corners) to the token grid; values below ``floor`` are dropped;
    ``conf_j`` is the mean of the rest (0 when none is left); ``conf`` the mean over the group.
    """
    if maps_work.ndim != 3 or maps_work.shape[0] == 0:
        raise ValueError(f"maps_work must be (B, S, S) with B >= 1, got {tuple(maps_work.shape)}")
    small = upsample(maps_work, grid)
    keep = small >= floor
    counts = keep.flatten(1).sum(dim=1)
    sums = torch.where(keep, small, torch.zeros_like(small)).flatten(1).sum(dim=1)
    conf_j = torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
    conf = float(conf_j.mean())
    return th0 + alpha_c * ((1.0 - conf) - bm_bar)


def map_confidences(maps: torch.Tensor) -> torch.Tensor:
    """Per-map confidence (B,): the mean of each map over its pixels >= that map's mean."""
    flat = maps.flatten(1).float()
    keep = flat >= flat.mean(dim=1, keepdim=True)
    return (flat * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)


def map_thresholds(
    maps: torch.Tensor, *, th0: float = TH0, alpha_c: float = ALPHA_C, bm_bar: float = BM_BAR
) -> torch.Tensor:
    """Per-map thresholds (B,), the UMS paper's eq. 6: ``th_i = th0 + alpha_c * ((1 - conf_i) - B_bar)``.
    B_bar belongs to the model that made the maps (0.48 is SCoSPARC's; UMS checkpoints store their own)."""
    return th0 + alpha_c * ((1.0 - map_confidences(maps)) - bm_bar)


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample positions and weights of a bilinear resize src -> dst with half-pixel centres (OpenCV
    INTER_LINEAR without antialiasing): returns (i0, i1, w1) with value = (1 - w1) * x[i0] + w1 * x[i1]."""
    pos = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    pos = np.clip(pos, 0, src - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, src - 1)
    return i0, i1, pos - i0


def component_grid_masks(labels: np.ndarray, n: int, grid: tuple[int, int]) -> np.ndarray:
    """Every component of a label image (S, S) resized to the token grid as the official code does
    (cv2.resize INTER_LINEAR of a uint8 0/1 mask, rounded half up): (n, h, w) bool for labels 1..n.
    At scale 8 this is the mean of each cell's centre 2x2 pixels, so 0.5 -> 1 and 0.25 -> 0."""
    ys0, ys1, wy = _linear_taps(labels.shape[0], grid[0])
    xs0, xs1, wx = _linear_taps(labels.shape[1], grid[1])
    out = np.zeros((n, *grid), dtype=bool)
    taps = [
        (labels[np.ix_(ys0, xs0)], np.outer(1 - wy, 1 - wx)),
        (labels[np.ix_(ys0, xs1)], np.outer(1 - wy, wx)),
        (labels[np.ix_(ys1, xs0)], np.outer(wy, 1 - wx)),
        (labels[np.ix_(ys1, xs1)], np.outer(wy, wx)),
    ]
    for k in range(1, n + 1):
        value = sum(w * (lab == k) for lab, w in taps)
        out[k - 1] = np.floor(np.asarray(value) + 0.5 + 1e-9) >= 1
    return out


def group_prototype(tokens: torch.Tensor, grid_masks: torch.Tensor) -> torch.Tensor:
    """F_G (C,): the mean over images of each image's mean token inside its grid mask.

    tokens (B, h, w, C); grid_masks (B, h, w) bool. Images with an empty mask are left out (the official code
    would divide by zero); with no foreground anywhere the prototype is the zero vector.
    """
    m = grid_masks.to(tokens.dtype)[..., None]
    counts = m.flatten(1, 2).sum(dim=1)  # (B, 1)
    sums = (tokens * m).flatten(1, 2).sum(dim=1)  # (B, C)
    valid = counts[:, 0] > 0
    if not bool(valid.any()):
        return torch.zeros(tokens.shape[-1], dtype=tokens.dtype)
    return (sums[valid] / counts[valid]).mean(dim=0)


@dataclass
class RegionDecision:
    """What region refinement did to one image: component scores and which survived."""

    scores: list[int]
    kept: list[int]
    fallback: str | None = None  # "no-components" or "no-positive-score"


REFINE_FALLBACKS = ("official", "best")


def refine_regions(
    binary: np.ndarray,
    tokens: torch.Tensor,
    prototype: torch.Tensor,
    *,
    box_sim: float = BOX_SIM,
    fallback: str = "official",
) -> tuple[np.ndarray, RegionDecision]:
    """Stage-2 refinement of one image.

    binary: (S, S) bool mask at working size; tokens: (h, w, C) of that image; prototype: (C,).
    Returns the union of the kept 8-connected components, (S, S) bool, and the decision record.
    ``fallback`` decides what happens when no component scores above zero (module docstring).
    """
    if fallback not in REFINE_FALLBACKS:
        raise ValueError(f"refine fallback must be 'official' or 'best', got {fallback!r}")
    labels, n = connected_components(binary, background=0, return_num=True, connectivity=2)
    if n == 0:
        return np.zeros_like(binary, dtype=bool), RegionDecision([], [], "no-components")
    grid = (int(tokens.shape[0]), int(tokens.shape[1]))
    cells = torch.from_numpy(component_grid_masks(labels, n, grid)).to(tokens.dtype)  # (n, h, w)
    emb = torch.einsum("khw,hwc->kc", cells, tokens)  # masked sums, proportional to the masked means
    cos = F.cosine_similarity(emb, prototype[None].expand_as(emb), dim=1, eps=1e-12)
    cos = torch.where(cells.flatten(1).sum(dim=1) > 0, cos, torch.zeros_like(cos))
    scores = [int(100.0 * float(c)) for c in cos]  # truncation toward zero, as int() does
    best = max(scores)
    if best > 0:
        kept = [k for k, s in enumerate(scores) if s / best >= box_sim]
        note = None
    elif fallback == "best":
        kept = [int(torch.argmax(cos))]
        note = "no-positive-score"
    elif best < 0:  # the official ratio rule as written: s / best >= box_sim holds for every s <= best < 0
        kept = [k for k, s in enumerate(scores) if s / best >= box_sim]
        note = "no-positive-score"
    else:  # best == 0: the official code divides by zero (undefined); keep the thresholded mask
        kept = list(range(n))
        note = "no-positive-score"
    refined = np.isin(labels, [k + 1 for k in kept])
    return refined, RegionDecision(scores, kept, note)


CRF_ASPECTS = ("squash", "keep")
CRF_UNIFORMS = ("official", "keep")


def output_map(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """The official output of a {0, 1} mask: ``uint8(mask * 255)`` resized to (H, W) with OpenCV's
    ``INTER_LINEAR``, so the edges of an upscaled mask are soft (uint8 HxW). ``> 127`` gives the binary
    mask."""
    img = (np.asarray(mask) > 0).astype(np.uint8) * np.uint8(255)
    if img.shape == size_hw:
        return img
    return cv2.resize(img, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bool mask -> bool mask of another size through the official output path (:func:`output_map`, then
    ``> 127``)."""
    return output_map(mask, size_hw) > 127


def resize_soft(soft: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Float map in [0, 1] -> float32 map of another size (bilinear)."""
    if soft.shape == size_hw:
        return soft.astype(np.float32)
    img = Image.fromarray(soft.astype(np.float32)).resize((size_hw[1], size_hw[0]), Resampling.BILINEAR)
    return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


def crf_input(
    image: np.ndarray, mask_work: np.ndarray, params: CRFParams = OFFICIAL_CRF, *, aspect: str = "squash"
) -> tuple[np.ndarray, np.ndarray]:
    """The image and labels the CRF sees: (hc, wc, 3) uint8 and (hc, wc) bool (see :func:`crf_refine`)."""
    if aspect not in CRF_ASPECTS:
        raise ValueError(f"CRF aspect must be 'squash' or 'keep', got {aspect!r}")
    height, width = image.shape[:2]
    if aspect == "squash":
        hc = wc = params.max_side
        small = (
            cv2.resize(image, (wc, hc), interpolation=cv2.INTER_LINEAR)
            if (height, width) != (hc, wc)
            else image
        )
    else:
        hc, wc = working_size(height, width, params.max_side)
        small = (
            image
            if (hc, wc) == (height, width)
            else np.asarray(Image.fromarray(image).resize((wc, hc), Resampling.BILINEAR))
        )
    if mask_work.shape != (hc, wc):
        labels = (
            np.asarray(Image.fromarray(mask_work.astype(np.uint8)).resize((wc, hc), Resampling.NEAREST)) > 0
        )
    else:
        labels = mask_work.astype(bool)
    return np.ascontiguousarray(small), labels


def crf_output(out: np.ndarray, *, uniform: str = "official") -> np.ndarray:
    """A CRF result (bool) as the official code writes it: uint8 {0, 1}; see :func:`crf_refine`."""
    if uniform not in CRF_UNIFORMS:
        raise ValueError(f"CRF uniform must be 'official' or 'keep', got {uniform!r}")
    if uniform == "official" and out.all():
        return np.zeros(out.shape, dtype=np.uint8)
    return out.astype(np.uint8)


def crf_refine(
    image: np.ndarray,
    mask_work: np.ndarray,
    params: CRFParams = OFFICIAL_CRF,
    *,
    aspect: str = "squash",
    uniform: str = "official",
) -> np.ndarray:
    """CRF a working-size mask against the original image; the {0, 1} result at the CRF's size (uint8).
    Raises what pydensecrf raises; :func:`output_map` takes the result to the original size.

    ``aspect="squash"`` (official): the image is resized to ``max_side`` x ``max_side`` whatever its aspect
    ratio, with OpenCV's ``INTER_LINEAR`` (which does not antialias), and the pairwise ``sxy`` are used as
    they are. ``aspect="keep"``: long side ``max_side``, PIL bilinear, ``sxy`` scaled to that size.
    ``uniform="official"``: a result that is foreground everywhere becomes empty (the official min-max
    normalisation divides by zero there); ``"keep"`` leaves it.
    """
    if uniform not in CRF_UNIFORMS:
        raise ValueError(f"CRF uniform must be 'official' or 'keep', got {uniform!r}")
    small, labels = crf_input(image, mask_work, params, aspect=aspect)
    return crf_output(dense_crf(small, labels, params), uniform=uniform)


def crf_refine_group(
    images: Sequence[np.ndarray],
    masks_work: Sequence[np.ndarray],
    params: CRFParams = OFFICIAL_CRF,
    *,
    aspect: str = "squash",
    uniform: str = "official",
    workers: int = 1,
) -> list[np.ndarray]:
    """:func:`crf_refine` of every image of a group, the CRFs on up to ``workers`` processes
    (:func:`~cosod.densecrf.run_crfs`; 1 runs them here). Same results whatever ``workers``."""
    if uniform not in CRF_UNIFORMS:
        raise ValueError(f"CRF uniform must be 'official' or 'keep', got {uniform!r}")
    inputs = [crf_input(img, m, params, aspect=aspect) for img, m in zip(images, masks_work, strict=True)]
    if workers <= 1:
        raw = [dense_crf(small, labels, params) for small, labels in inputs]
    else:
        raw = run_crfs([i[0] for i in inputs], [i[1] for i in inputs], params, workers)
    return [crf_output(r, uniform=uniform) for r in raw]
