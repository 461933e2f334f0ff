"""Fine-tuning a model's head on corrected masks, on cached frozen features, and scoring it on held-out ones.

Data: :class:`FinetuneGroup` lists, per group, its images (HxWx3 uint8 RGB), their content hashes and, for
the corrected ones, the corrected mask (bool HxW at the original size; None for images nobody corrected).

Split: a corrected image is held out when ``heldout_score(hash) < fraction`` (a sha256 of its content hash
mapped to [0, 1)), so an image's side never changes as corrections accumulate; when no image falls under
the fraction, the one with the lowest score is held out. Held-out images never reach the loss; they still
serve as context when their group is predicted.

Training (:func:`finetune`): a copy of the active head's module, the method's fine-tuning loss
(:meth:`cosod.methods.base.Method.loss` with targets from :meth:`~cosod.methods.base.Method.targets`) and
Adam with the method's weight decay and betas, through the one loop of :mod:`cosod.loop` (``steps`` steps,
one group of at most ``max_group`` images each); :meth:`~cosod.methods.base.Method.finish` completes the
head.

- **SCoSPARC stage 1**: loss ``w_ss * (L_cooc + 0.3 L_sal) + w_sup * (BCE + soft IoU)``, the supervised term
  on the corrected images' maps at the token grid (h x w) against the correction box-averaged to the grid (a
  fraction in [0, 1]).
- **UMS**: targets are the corrections for corrected images and the active model's predicted masks
  (pseudo-labels) for the others; BCE + IoU on the final and side outputs; B_bar is measured again on the
  training groups afterwards.

Evaluation (:func:`evaluate_heldout`): each group is predicted whole through the real pipeline (threshold,
region refinement, CRF) and the final binary masks of the held-out images are scored against their
corrections with :class:`~cosod.metrics.CoSODEvaluator` (IoU, max F, MAE, HCE, ...); :func:`score_heldout`
keeps each image's scores too, for the promotion rule (:mod:`cosod.promotion`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .loop import adam, run_epochs
from .methods import Batch, LossWeights
from .methods.scosparc import mask_to_grid as mask_to_grid
from .methods.scosparc import supervised_terms as supervised_terms
from .methods.ums import mask_to_square as mask_to_square
from .metrics import CoSODEvaluator
from .pipeline import Pipeline, PipelineConfig
from .promotion import HIGHER_IS_BETTER as HIGHER_IS_BETTER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300
    lr: float = 1e-3
    supervised_weight: float = 1.0
    self_supervised_weight: float = 1.0
    max_group: int = 24
    seed: int = 123
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction!r}")
        if self.max_group < 2:
            raise ValueError(f"max_group must be >= 2, got {self.max_group!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class FinetuneGroup:
    """A group: ``images`` HxWx3 uint8 RGB, ``hashes`` their :func:`~cosod.features.image_hash`, ``masks``
    bool HxW corrections at each image's size (None where nobody corrected the image)."""

    name: str
    images: list[np.ndarray]
    hashes: list[str]
    masks: list[np.ndarray | None]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.hashes) == len(self.masks):
            raise ValueError(
                f"group {self.name!r}: {len(self.images)} images, {len(self.hashes)} hashes, "
                f"{len(self.masks)} masks; they must match"
            )
        for img, m in zip(self.images, self.masks, strict=True):
            if m is not None and (m.dtype != bool or m.shape != img.shape[:2]):
                raise ValueError(
                    f"group {self.name!r}: a mask must be bool at its image's size {img.shape[:2]}, "
                    f"got {m.dtype} {m.shape}"
                )


@dataclass
class FinetuneResult:
    """A trained candidate head (the method's: a Stage1Net, a UMSCheckpoint, ...), the training record and the
    split."""

    head: Any
    train_metrics: dict[str, Any]
    train_hashes: list[str]
    heldout_hashes: list[str]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def heldout_score(digest: str) -> float:
    """A deterministic number in [0, 1) from an image's content hash."""
    return int(hashlib.sha256(f"heldout:{digest}".encode()).hexdigest()[:15], 16) / float(16**15)


def split_heldout(hashes: Sequence[str], fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(train, held-out) of the distinct ``hashes`` (see the module doc); under 2 images: none held out."""
    uniq = sorted(set(hashes))
    if len(uniq) < 2:
        return uniq, []
    held = [h for h in uniq if heldout_score(h) < fraction]
    if not held:
        held = [min(uniq, key=heldout_score)]
    if len(held) == len(uniq):
        held.remove(max(held, key=heldout_score))
    hs = set(held)
    return [h for h in uniq if h not in hs], held


def _train_part(group: FinetuneGroup, held: set[str]) -> list[int]:
    return [i for i, h in enumerate(group.hashes) if h not in held]


def head_pipeline(base: Pipeline, head: Any, config: PipelineConfig | None = None) -> Pipeline:
    """A :class:`Pipeline` with ``head`` (the method's: Stage1Net, UMSCheckpoint, ...) on ``base``'s
    backbone(s) and cache; ``config`` defaults to ``base.config`` (it must name the same model)."""
    cfg = config or base.config
    if cfg.model != base.config.model:
        raise ValueError(f"config model {cfg.model!r} differs from the base pipeline's {base.config.model!r}")
    return Pipeline(cfg, base.backbone, head, base.cache, v2_backbone=base.v2_backbone)


@dataclass
class HeldoutScores:
    """The held-out scores of one version: ``summary`` ``{"n_images", **overall measures}`` and
    ``per_image`` ``{(group, image hash): {measure: value}}`` (see :meth:`cosod.metrics.CoSODEvaluator.
    per_image`), the pairs the promotion rule compares (:func:`cosod.promotion.decide`)."""

    summary: dict[str, Any]
    per_image: dict[tuple[str, str], dict[str, float]]

    def metric(self, name: str) -> dict[tuple[str, str], float]:
        return {k: v[name] for k, v in self.per_image.items()}


def score_heldout(pipeline: Pipeline, groups: Sequence[FinetuneGroup], heldout: set[str]) -> HeldoutScores:
    """Predict each group containing held-out images; score those images' final masks against their
    corrections, overall and per image. ``n_images`` 0 (no measures, no images) when there is none."""
    ev = CoSODEvaluator()
    for group in groups:
        idx = [i for i, h in enumerate(group.hashes) if h in heldout and group.masks[i] is not None]
        if not idx:
            continue
        pred = pipeline.predict_group(group.images, hashes=group.hashes)
        for i in idx:
            gt = group.masks[i]
            assert gt is not None
            ev.step(np.asarray(pred.masks[i], dtype=bool), gt, group=group.name, name=group.hashes[i])
    if ev.n_images == 0:
        return HeldoutScores({"n_images": 0}, {})
    per_image = {
        (str(r.pop("group")), str(r.pop("name"))): {k: float(v) for k, v in r.items()} for r in ev.per_image()
    }
    return HeldoutScores({"n_images": ev.n_images, **ev.results()["overall"]}, per_image)


def evaluate_heldout(
    pipeline: Pipeline, groups: Sequence[FinetuneGroup], heldout: set[str]
) -> dict[str, Any]:
    """The overall held-out scores (:func:`score_heldout`'s ``summary``): ``{"n_images", **measures}``."""
    return score_heldout(pipeline, groups, heldout).summary


def finetune(
    active: Pipeline,
    groups: Sequence[FinetuneGroup],
    config: FinetuneConfig = FinetuneConfig(),
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Split the corrected images, then train a copy of ``active``'s head on the training part (see the
    module doc). ``active`` is not modified. Raises ValueError when nothing is left to train on."""
    t0 = time.perf_counter()
    corrected = [h for g in groups for h, m in zip(g.hashes, g.masks, strict=True) if m is not None]
    train_h, held_h = split_heldout(corrected, config.heldout_fraction)
    held = set(held_h)
    parts = [(g, _train_part(g, held)) for g in groups]
    parts = [(g, idx) for g, idx in parts if len(idx) >= 2]
    if not parts:
        raise ValueError("no group has 2 or more training images after holding out the validation images")
    method = active.method
    batches = [_batch(active, g, idx) for g, idx in parts]
    module = copy.deepcopy(method.module(active.head))
    defaults = method.train_defaults
    opt = adam(module, config.lr, defaults.weight_decay, defaults.betas)
    weights = LossWeights(supervised=config.supervised_weight, self_supervised=config.self_supervised_weight)
    hist = run_epochs(
        module,
        opt,
        batches.__getitem__,
        len(batches),
        lambda batch: method.loss(module, batch, weights),
        seed=config.seed,
        max_group=config.max_group,
        epochs=None,
        max_steps=config.steps,
        reverse=method.finetune_reversed,
        on_step=on_step,
    )
    metrics = {**hist.metrics(), "last": hist.tail_mean(20)}  # last: the mean of the last 20 steps
    head, extra = method.finish(
        active.head, module, batches.__getitem__, len(batches), max_group=config.max_group, metrics=metrics
    )
    metrics.update(extra)
    seconds = time.perf_counter() - t0
    log.info("fine-tuned %s head on %d groups in %.1f s", method.name, len(parts), seconds)
    return FinetuneResult(head, {**metrics, "seconds": seconds}, train_h, held_h, seconds)


def _batch(active: Pipeline, group: FinetuneGroup, idx: list[int]) -> Batch:
    """The training batch of ``group``'s images at ``idx``: their features from every backbone and the
    method's targets; with ``fills_uncorrected``, uncorrected images take the active model's masks."""
    masks = [group.masks[i] for i in idx]
    if active.method.fills_uncorrected and any(m is None for m in masks):
        pred = active.predict_group(group.images, hashes=group.hashes).masks
        masks = [np.asarray(pred[i], dtype=bool) if m is None else m for m, i in zip(masks, idx, strict=True)]
    feats = active.encode_all([group.images[i] for i in idx], [group.hashes[i] for i in idx])
    targets, labelled = active.method.targets(masks, feats, active.config.input_size)
    return Batch(tuple(feats), targets, labelled)
