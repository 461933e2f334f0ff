"""When a fine-tuned candidate replaces the active version: evidence over the held-out images, not one number.

Both versions are scored on the same held-out images; each image gives a *gain*, the candidate's score minus
the active version's on ``metric`` (the active's minus the candidate's for ``mae`` and ``hce``, where lower is
better). The rule (:func:`decide`):

1. at least ``min_heldout`` held-out images (``COSOD_PROMOTE_MIN_HELDOUT``, 5 by default); with fewer the
   candidate is kept, not promoted, whatever its scores;
2. a paired bootstrap over the images: the images are resampled with replacement ``resamples`` (2000) times,
   each resample keeping an image's two scores together, and the mean gain is taken of each; the lower
   bound of the one-sided ``confidence`` (95 %) interval of the mean gain is the ``1 - confidence``
   quantile of those means (the percentile method). The candidate is promoted only when that lower bound
   is above ``margin`` (``COSOD_PROMOTE_MARGIN``).

So one lucky image never promotes a version: alone it is under the minimum, and among others that did not
improve it is missing from a large share of the resamples, whose mean gain is then not positive.

The bootstrap is ``scipy.stats.bootstrap`` (scipy is a dependency already) with a generator seeded by
``seed``: the same scores always give the same decision. The percentile method rather than scipy's default
BCa: it is defined for every input (BCa gives NaN when every image has the same gain, a case that happens
with binary masks), and it is the rule as written above. When every gain is the same (or there is one
image, ``min_heldout`` 1) there is no spread to resample and the bound is that gain.

Per-image scores: ``iou``, ``mae``, ``s_measure``, ``hce``, ``mean_f`` and ``mean_e`` are means over images
anyway; for ``max_f`` and ``max_e`` an image's score is the maximum over thresholds of its own curve (the
dataset's max F takes the maximum of the averaged curve, so their mean differs from ``scores["max_f"]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

HIGHER_IS_BETTER = {
    "iou": True,
    "max_f": True,
    "mean_f": True,
    "max_e": True,
    "mean_e": True,
    "s_measure": True,
    "mae": False,
    "hce": False,
}
MIN_HELDOUT = 5
RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


@dataclass(frozen=True)
class PromotionRule:
    """``metric`` and ``margin`` as in ``COSOD_PROMOTE_METRIC`` / ``COSOD_PROMOTE_MARGIN``, ``min_heldout``
    as ``COSOD_PROMOTE_MIN_HELDOUT``; ``confidence``, ``resamples`` and ``seed`` of the bootstrap."""

    metric: str = "iou"
    margin: float = 0.005
    min_heldout: int = MIN_HELDOUT
    confidence: float = CONFIDENCE
    resamples: int = RESAMPLES
    seed: int = SEED

    def __post_init__(self) -> None:
        if self.metric not in HIGHER_IS_BETTER:
            raise ValueError(
                f"unknown promotion metric {self.metric!r}; known: {', '.join(HIGHER_IS_BETTER)}"
            )
        if self.min_heldout < 1:
            raise ValueError(f"min_heldout must be >= 1, got {self.min_heldout!r}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must lie in [0.5, 1), got {self.confidence!r}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be >= 100, got {self.resamples!r}")


@dataclass(frozen=True)
class Evidence:
    """The decision and what it rests on. ``n``: paired held-out images; ``mean_gain``: their mean gain
    (positive: the candidate is better); ``lower``: the bootstrap's lower bound of the mean gain (None
    below the minimum); ``candidate`` / ``active``: the mean per-image scores; ``images``: per image
    ``{"image", "candidate", "active", "gain"}``, in key order."""

    promoted: bool
    decision: str
    metric: str
    n: int
    mean_gain: float | None
    lower: float | None
    candidate: float | None
    active: float | None
    rule: dict[str, Any]
    images: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lower_bound(gains: np.ndarray, *, confidence: float, resamples: int, seed: int) -> float:
    """The lower end of the one-sided ``confidence`` percentile-bootstrap interval of ``gains``' mean."""
    gains = np.asarray(gains, dtype=np.float64)
    if gains.size == 0:
        raise ValueError("no gains to bootstrap")
    if gains.size == 1 or np.ptp(gains) == 0.0:
        return float(gains[0])  # no spread: every resample has the same mean
    from scipy.stats import bootstrap

    res = bootstrap(
        (gains,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        alternative="greater",
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low)


def _images(n: int) -> str:
    return f"{n} held-out image{'s' if n != 1 else ''}"


def decide(candidate: Mapping[Any, float], active: Mapping[Any, float], rule: PromotionRule) -> Evidence:
    """Promote or keep (see the module doc). ``candidate`` / ``active``: per held-out image (any sortable
    key, e.g. ``(group, image hash)``) the version's score on ``rule.metric``; only images both have, with
    finite scores, count, taken in key order (the decision does not depend on the mappings' order)."""
    sign = 1.0 if HIGHER_IS_BETTER[rule.metric] else -1.0
    both = candidate.keys() & active.keys()
    keys = sorted((k for k in both if math.isfinite(candidate[k]) and math.isfinite(active[k])), key=repr)
    cand = np.array([float(candidate[k]) for k in keys], dtype=np.float64)
    act = np.array([float(active[k]) for k in keys], dtype=np.float64)
    gains = sign * (cand - act)
    images = [
        {"image": list(k) if isinstance(k, tuple) else k, "candidate": c, "active": a, "gain": g}
        for k, c, a, g in zip(keys, cand.tolist(), act.tolist(), gains.tolist(), strict=True)
    ]
    n = len(keys)

    def evidence(promoted: bool, decision: str, lower: float | None) -> Evidence:
        means = [float(x.mean()) if n else None for x in (gains, cand, act)]
        return Evidence(
            promoted, decision, rule.metric, n, means[0], lower, means[1], means[2], asdict(rule), images
        )

    if n < rule.min_heldout:
        return evidence(False, f"kept: {_images(n)}, promotion needs at least {rule.min_heldout}", None)
    mean = float(gains.mean())
    low = lower_bound(gains, confidence=rule.confidence, resamples=rule.resamples, seed=rule.seed)
    promoted = low > rule.margin
    pct = f"{rule.confidence * 100:g}%"
    decision = (
        f"{'promoted' if promoted else 'kept the active version'}: {rule.metric} gain {mean:+.4f} "
        f"(candidate {cand.mean():.4f} vs active {act.mean():.4f}) over {_images(n)}; "
        f"{pct} lower bound {low:+.4f} {'>' if promoted else '<='} margin {rule.margin:g} "
        f"(paired bootstrap, {rule.resamples} resamples)"
    )
    return evidence(promoted, decision, low)
