"""Propagate corrections within a group: one corrected mask says what the group's object is.

Input: a group's cached backbone features (:class:`~cosod.backbones.BackboneFeatures`, as
:meth:`Pipeline.encode <cosod.pipeline.Pipeline.encode>` returns them; no backbone pass is made), its images
and the corrected masks of some of its members. Output: masks and scores for the other members.

    corrected masks -> token grid (foreground fraction per cell, as fine-tuning targets are made)
        -> foreground prototype P_fg: mean of the L2-normalised tokens weighted by the fraction, over every
           corrected image; background prototype P_bg: the same with weight 1 - fraction
        -> per image and token: s = cos(t, P_fg) - cos(t, P_bg), min-max normalised per image to r in [0, 1]
           and passed through stage 1's transfer sigmoid((r - 0.65) / 0.15) (so the maps have the range
           and shape the adaptive threshold was calibrated on)
        -> :meth:`Pipeline.masks_from_maps <cosod.pipeline.Pipeline.masks_from_maps>`: the pipeline's own
           threshold, stage-2 region refinement with P_fg as the group prototype, dense CRF, output size.

A propagated mask is therefore post-processed exactly like an unprompted one. More corrections add their
tokens to both prototypes. A corrected mask that is all False says "this image has no common object": its
tokens all enter the background prototype (so whatever it shows with the other images, a recurring
distractor, is pushed out). With no corrected foreground at all there is nothing to propagate
(:attr:`Propagation.propagated` is False and no mask is made).

The prototypes live in the first backbone's token space (DINO), whatever the method: for UMS the region
refinement scores these tokens, not the network's enriched features. The absence decision
(:mod:`cosod.absence`) runs when the pipeline's ``config.absence`` is on, or when asked.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .absence import AbsenceDecision
from .backbones import BackboneFeatures
from .methods.base import ModelMaps
from .methods.scosparc import mask_to_grid
from .pipeline import GroupPrediction, Pipeline, _check_images
from .refine import upsample
from .scosparc import TEMPERATURE, THRESH


@dataclass
class Prototypes:
    """Foreground and background prototypes of a group's corrections: unit vectors (C,) float32, None when
    their total weight is 0 (no corrected foreground, or no background). ``fg_weight`` / ``bg_weight``: the
    number of token cells that went into each (fractions summed); ``corrected``: the image indices used."""

    foreground: torch.Tensor | None
    background: torch.Tensor | None
    fg_weight: float
    bg_weight: float
    corrected: list[int]


@dataclass
class Propagation:
    """What :func:`propagate` made.

    targets: the group indices that were propagated to, in order (the uncorrected images by default).
    masks / scores: per target index, bool HxW at the image's size and a score in [0, 1] (mean map value
        inside the mask; 0 for an empty mask). Empty when nothing was propagated.
    prediction: the :class:`~cosod.pipeline.GroupPrediction` of the targets, in ``targets`` order (soft maps,
        thresholds, region records, absence decision), None when nothing was propagated.
    prototypes: the prototypes used; propagated: False when there was no corrected foreground.
    timings: seconds: "prototype" (prototypes and maps), then the pipeline's "refine", "crf", "resize", and
        "total".
    """

    targets: list[int]
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[int, float] = field(default_factory=dict)
    prediction: GroupPrediction | None = None
    prototypes: Prototypes | None = None
    propagated: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def absence(self) -> AbsenceDecision | None:
        """The absence decision over the targets (in ``targets`` order), when it ran."""
        return None if self.prediction is None else self.prediction.absence

    @property
    def absent(self) -> list[int]:
        """Group indices of the targets judged without the object (empty when the decision did not run)."""
        decision = self.absence
        return [] if decision is None else [self.targets[j] for j in decision.absent]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def correction_prototypes(tokens: torch.Tensor, corrections: Mapping[int, np.ndarray]) -> Prototypes:
    """Prototypes from corrected masks.

    tokens: (B, h, w, C) float backbone tokens of the group. corrections: group index -> bool HxW mask at
    that image's size (any size: it is box-averaged to the (h, w) grid, squashed as the backbone squashes
    the image). Each token of a corrected image is L2-normalised and weighted by its cell's foreground
    fraction f (foreground) and 1 - f (background); each prototype is the normalised weighted mean.
    """
    grid = (int(tokens.shape[1]), int(tokens.shape[2]))
    idx = sorted(corrections)
    c = int(tokens.shape[-1])
    fg_sum, bg_sum = torch.zeros(c), torch.zeros(c)
    fg_w = bg_w = 0.0
    for i in idx:
        frac = mask_to_grid(np.asarray(corrections[i], dtype=bool), grid).clamp(0.0, 1.0)  # (h, w)
        unit = _unit(tokens[i])  # (h, w, C)
        fg_sum += torch.einsum("hw,hwc->c", frac, unit)
        bg_sum += torch.einsum("hw,hwc->c", 1.0 - frac, unit)
        fg_w += float(frac.sum())
        bg_w += float((1.0 - frac).sum())
    fg = _unit(fg_sum / fg_w) if fg_w > 0 else None
    bg = _unit(bg_sum / bg_w) if bg_w > 0 else None
    return Prototypes(fg, bg, fg_w, bg_w, idx)


def prototype_maps(tokens: torch.Tensor, prototypes: Prototypes) -> torch.Tensor:
    """(B, h, w, C) tokens -> (B, h, w) float32 maps in [sigmoid(-0.65/0.15), sigmoid(0.35/0.15)] =
    [0.0130, 0.9116], stage 1's range: ``sigmoid((minmax_i(s) - 0.65) / 0.15)`` with
    ``s = cos(t, P_fg) - cos(t, P_bg)`` (``cos(t, P_bg)`` = 0 without a background prototype) and the min-max
    over each image's cells. Raises ValueError without a foreground prototype."""
    if prototypes.foreground is None:
        raise ValueError("no corrected foreground: nothing to propagate")
    unit = _unit(tokens)
    s = unit @ prototypes.foreground
    if prototypes.background is not None:
        s = s - unit @ prototypes.background
    lo = s.amin(dim=(1, 2), keepdim=True)
    hi = s.amax(dim=(1, 2), keepdim=True)
    r = (s - lo) / (hi - lo).clamp_min(1e-12)
    return torch.sigmoid((r - THRESH) / TEMPERATURE).float()


def _check_corrections(images: Sequence[np.ndarray], corrections: Mapping[int, np.ndarray]) -> None:
    n = len(images)
    for i, mask in corrections.items():
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise ValueError(f"correction index {i!r} is not an image of this group of {n}")
        if not isinstance(mask, np.ndarray) or mask.ndim != 2:
            desc = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
            raise ValueError(f"correction of image {i}: expected an HxW bool mask, got {desc}")
        if mask.shape != images[i].shape[:2]:
            raise ValueError(
                f"correction of image {i}: mask is {mask.shape[0]}x{mask.shape[1]}, "
                f"the image is {images[i].shape[0]}x{images[i].shape[1]}"
            )


def propagate(
    pipeline: Pipeline,
    feats: BackboneFeatures,
    images: Sequence[np.ndarray],
    corrections: Mapping[int, np.ndarray],
    *,
    targets: Sequence[int] | None = None,
    absence: bool | None = None,
) -> Propagation:
    """Masks for the images of a group from the corrected masks of some of them (module docstring).

    pipeline: gives the threshold mode and constants, refinement, CRF settings and CRF workers (its backbone
        is not run). feats: the group's features from ``pipeline.encode(images)`` (the first backbone), B
        images in the order of ``images``. images: B HxWx3 uint8 RGB arrays (the CRF's input and the output
        sizes). corrections: index -> bool HxW mask at that image's size; all False = "no common object".
    targets: the indices to propagate to (default: every image without a correction, in order). absence:
        run the absence decision over the targets (None: ``pipeline.config.absence``).

    Raises ValueError naming a bad image, mask, index or feature shape.
    """
    t0 = time.perf_counter()
    _check_images(images)
    if len(feats) != len(images):
        raise ValueError(f"features of {len(feats)} images for a group of {len(images)}")
    _check_corrections(images, corrections)
    if targets is None:
        targets = [i for i in range(len(images)) if i not in corrections]
    targets = [int(i) for i in targets]
    for i in targets:
        if not 0 <= i < len(images):
            raise ValueError(f"target index {i} is not an image of this group of {len(images)}")
    protos = correction_prototypes(feats.tokens, corrections)
    result = Propagation(targets=targets, prototypes=protos)
    if protos.foreground is None or not targets:
        result.timings = {"total": time.perf_counter() - t0}
        return result
    tokens = feats.tokens[targets].float()  # a float16 cache: refinement scores in float32
    grid_maps = prototype_maps(tokens, protos)
    maps = ModelMaps(upsample(grid_maps, pipeline.config.input_size), tokens, grid_maps, targets)
    t1 = time.perf_counter()
    pred = pipeline.masks_from_maps(
        [images[i] for i in targets], maps, prototype=protos.foreground, absence=absence
    )
    pred.mode = "propagated"
    result.prediction = pred
    result.masks = dict(zip(targets, pred.masks, strict=True))
    result.scores = dict(zip(targets, pred.scores, strict=True))
    result.propagated = True
    result.timings = {"prototype": t1 - t0, **pred.timings, "total": time.perf_counter() - t0}
    return result
