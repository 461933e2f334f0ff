"""Does an image contain the group's common object? An opt-in decision (off by default).

The evidence is the one stage-2 refinement already computes: the cosine similarity between the group
prototype and each connected component of the image's thresholded map (:class:`~cosod.refine.RegionDecision`
``scores``, integer percent). An image's **best-region similarity** ``s_i`` is its highest component score
/ 100, in [-1, 1]; an image without any component has none (NaN).

An image is judged **without the object** when ``s_i`` is an outlier below the rest of the group, by a robust
(leave-one-out) z-score::

    m_i = median(s_j, j != i)        d_i = max(1.4826 * MAD(s_j, j != i), min_spread)
    z_i = (s_i - m_i) / d_i          absent  <=>  z_i < -z_threshold     (default 3.0)

``1.4826 * MAD`` estimates the standard deviation of normally distributed scores; ``min_spread`` (0.05) keeps
a group of near-identical scores from flagging an image a few points below them: with the defaults an image
is flagged only when its best region is at least 0.15 (cosine) below the median of the others. An image with
no region is absent. With fewer than ``min_images`` (3) other images with a score nothing is flagged: there
is no group to compare with. The rule assumes most of the group contains the object (the median is the
typical present image); a group where most images lack it is outside what it can judge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .refine import RegionDecision

ABSENCE_Z = 3.0
ABSENCE_MIN_SPREAD = 0.05
ABSENCE_MIN_IMAGES = 3
MAD_TO_SIGMA = 1.4826


@dataclass
class AbsenceDecision:
    """Per image, in input order: ``present`` (False: judged without the group's object), the evidence
    ``similarity`` (best-region cosine, NaN without a region), the leave-one-out ``median`` and ``spread`` it
    is compared with, and ``z`` (NaN where no comparison was possible, -inf without a region); the
    ``z_threshold`` used."""

    present: list[bool]
    similarity: list[float]
    median: list[float]
    spread: list[float]
    z: list[float]
    z_threshold: float

    def __len__(self) -> int:
        return len(self.present)

    @property
    def absent(self) -> list[int]:
        """Indices of the images judged without the object."""
        return [i for i, p in enumerate(self.present) if not p]


def best_region_similarity(region: RegionDecision | None) -> float:
    """The best component score of a refinement record as a cosine (``max(scores) / 100``); NaN when the
    image had no component (or no record)."""
    if region is None or not region.scores:
        return math.nan
    return max(region.scores) / 100.0


def decide_absence(
    similarities: Sequence[float],
    *,
    z_threshold: float = ABSENCE_Z,
    min_spread: float = ABSENCE_MIN_SPREAD,
    min_images: int = ABSENCE_MIN_IMAGES,
) -> AbsenceDecision:
    """Judge each image from its best-region similarity against the rest of the group (module docstring).

    similarities: one float per image (NaN: no region). Returns an :class:`AbsenceDecision`.
    """
    if z_threshold <= 0 or min_spread <= 0:
        raise ValueError(f"z_threshold and min_spread must be > 0, got {z_threshold} and {min_spread}")
    s = np.asarray([float(x) for x in similarities], dtype=np.float64)
    n = len(s)
    present, medians, spreads, zs = [], [], [], []
    for i in range(n):
        others = np.delete(s, i)
        others = others[~np.isnan(others)]
        if np.isnan(s[i]):
            med = float(np.median(others)) if len(others) else math.nan
            present.append(False)
            medians.append(med)
            spreads.append(math.nan)
            zs.append(-math.inf)
            continue
        if len(others) < min_images:
            present.append(True)
            medians.append(math.nan)
            spreads.append(math.nan)
            zs.append(math.nan)
            continue
        med = float(np.median(others))
        spread = max(MAD_TO_SIGMA * float(np.median(np.abs(others - med))), min_spread)
        z = (float(s[i]) - med) / spread
        present.append(not z < -z_threshold)
        medians.append(med)
        spreads.append(spread)
        zs.append(z)
    return AbsenceDecision(present, [float(x) for x in s], medians, spreads, zs, z_threshold)


def decide_from_regions(
    regions: Sequence[RegionDecision | None], *, z_threshold: float = ABSENCE_Z
) -> AbsenceDecision:
    """:func:`decide_absence` of the best-region similarities of a group's refinement records (as
    :attr:`cosod.pipeline.GroupPrediction.regions` holds them)."""
    return decide_absence([best_region_similarity(r) for r in regions], z_threshold=z_threshold)
