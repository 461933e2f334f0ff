"""cosod.promotion: the minimum number of held-out images and the paired bootstrap, on scores whose answer is
known (pure numbers, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from cosod.promotion import PromotionRule, decide, lower_bound

RULE = PromotionRule()  # iou, margin 0.005, at least 5 images, 95 %, 2000 resamples, seed 0


def scores(values: list[float]) -> dict[str, float]:
    return {f"img{k:03d}": v for k, v in enumerate(values)}


def test_the_defaults_are_the_documented_ones() -> None:
    assert (RULE.metric, RULE.margin, RULE.min_heldout) == ("iou", 0.005, 5)
    assert (RULE.confidence, RULE.resamples, RULE.seed) == (0.95, 2000, 0)


def test_one_lucky_image_alone_is_under_the_minimum() -> None:
    ev = decide({"a": 0.95}, {"a": 0.10}, RULE)  # a gain of +0.85, on one image
    assert not ev.promoted and ev.n == 1 and ev.lower is None
    assert ev.decision == "kept: 1 held-out image, promotion needs at least 5"
    assert ev.mean_gain == pytest.approx(0.85)


def test_one_lucky_image_among_unchanged_ones_does_not_promote() -> None:
    # 9 images the candidate scores exactly as the active version, one it improves by 0.4: the mean gain is
    # 0.04, far above the margin (the old rule promoted), but 0.9^10 = 35 % of the resamples miss the lucky
    # image and have a mean gain of exactly 0, so the 5 % quantile is 0
    active = [0.5] * 10
    cand = [0.5] * 9 + [0.9]
    ev = decide(scores(cand), scores(active), RULE)
    assert ev.mean_gain == pytest.approx(0.04) and ev.mean_gain > RULE.margin
    assert ev.lower == 0.0 and not ev.promoted
    assert ev.decision.startswith("kept the active version: iou gain +0.0400")
    assert "95% lower bound +0.0000 <= margin 0.005 (paired bootstrap, 2000 resamples)" in ev.decision
    assert not decide(scores(cand), scores(active), PromotionRule(margin=0.0)).promoted  # 0 is not > 0


def test_a_consistent_small_gain_over_many_images_promotes() -> None:
    rng = np.random.default_rng(1)
    active = rng.uniform(0.4, 0.8, size=20)
    gains = 0.02 + rng.uniform(-0.005, 0.005, size=20)  # every image improves by 0.015 .. 0.025
    ev = decide(scores(list(active + gains)), scores(list(active)), RULE)
    assert ev.n == 20 and ev.promoted
    assert ev.mean_gain == pytest.approx(gains.mean())
    assert gains.min() <= ev.lower < ev.mean_gain  # the bound lies within the gains, below their mean
    assert ev.lower > 0.015 > RULE.margin
    assert ev.decision.startswith("promoted: iou gain +0.0")
    assert [i["gain"] for i in ev.images] == pytest.approx(list(gains))


def test_a_large_mean_gain_from_one_outlier_with_the_rest_worse_does_not_promote() -> None:
    # 9 images lose 0.02, one gains 0.5: mean gain +0.032; a resample without the outlier (35 % of them)
    # has mean -0.02, so the lower bound is -0.02
    active = [0.6] * 9 + [0.3]
    cand = [0.58] * 9 + [0.8]
    ev = decide(scores(cand), scores(active), RULE)
    assert ev.mean_gain == pytest.approx(0.032) and ev.mean_gain > RULE.margin
    assert ev.lower == pytest.approx(-0.02) and not ev.promoted


def test_below_the_minimum_nothing_promotes_however_large_the_gain() -> None:
    active, cand = [0.2, 0.3, 0.25, 0.1], [0.9, 0.95, 0.92, 0.88]
    ev = decide(scores(cand), scores(active), RULE)
    assert not ev.promoted and ev.decision == "kept: 4 held-out images, promotion needs at least 5"
    assert ev.candidate == pytest.approx(np.mean(cand)) and ev.active == pytest.approx(np.mean(active))
    ev4 = decide(scores(cand), scores(active), PromotionRule(min_heldout=4))
    assert ev4.promoted and ev4.lower is not None and ev4.lower >= 0.62  # the smallest gain is 0.62
    assert decide({}, {}, RULE).decision == "kept: 0 held-out images, promotion needs at least 5"


def test_only_images_scored_by_both_versions_are_paired() -> None:
    cand = {**scores([0.9] * 6), "extra": 1.0, "nan": float("nan")}
    active = {**scores([0.5] * 6), "other": 0.0, "nan": 0.5}
    ev = decide(cand, active, RULE)
    assert ev.n == 6 and [i["image"] for i in ev.images] == sorted(scores([0.0] * 6))
    assert ev.lower == pytest.approx(0.4) and ev.promoted  # no spread: the bound is the common gain
    tuples = decide({("g", "h1"): 0.9}, {("g", "h1"): 0.5}, RULE)
    pair = {"image": ["g", "h1"], "candidate": 0.9, "active": 0.5, "gain": pytest.approx(0.4)}
    assert tuples.images == [pair]


def test_lower_is_better_metrics_count_a_drop_as_a_gain() -> None:
    active = [0.10, 0.12, 0.09, 0.11, 0.10, 0.13]
    better = [a - 0.03 for a in active]  # mae fell by 0.03 on every image
    ev = decide(scores(better), scores(active), PromotionRule(metric="mae"))
    assert ev.promoted and ev.mean_gain == pytest.approx(0.03) and ev.lower == pytest.approx(0.03)
    worse = decide(scores(active), scores(better), PromotionRule(metric="hce", margin=0.0))
    assert not worse.promoted and worse.mean_gain == pytest.approx(-0.03)


def test_the_bound_is_the_bootstraps_percentile() -> None:
    # half the images gain 1, half 0: a resample's mean is k/20 with k ~ Binomial(20, 1/2), whose 5 %
    # quantile is 6 (P(k <= 5) = 0.021, P(k <= 6) = 0.058); so the bound is about 0.3
    gains = np.array([0.0, 1.0] * 10)
    low = lower_bound(gains, confidence=0.95, resamples=2000, seed=0)
    assert low == pytest.approx(0.30, abs=0.03)
    assert lower_bound(gains, confidence=0.99, resamples=2000, seed=0) < low  # more confidence, lower bound


def test_the_decision_is_deterministic_and_independent_of_order() -> None:
    rng = np.random.default_rng(7)
    active = rng.uniform(0.3, 0.9, size=12)
    cand = active + rng.normal(0.01, 0.02, size=12)
    first = decide(scores(list(cand)), scores(list(active)), RULE)
    again = decide(scores(list(cand)), scores(list(active)), RULE)
    backwards = decide(dict(reversed(scores(list(cand)).items())), scores(list(active)), RULE)
    assert first == again == backwards
    assert first.lower == again.lower  # bit for bit: the generator is seeded


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="'f1'"):
        PromotionRule(metric="f1")
    with pytest.raises(ValueError, match="min_heldout must be >= 1"):
        PromotionRule(min_heldout=0)
    with pytest.raises(ValueError, match="confidence"):
        PromotionRule(confidence=1.0)
