"""Propagate corrections within a group: one corrected mask says what the group's object is.

Input: a group's cached backbone features (:class:`~cosod.backbones.BackboneFeatures`, as
:meth:`Pipeline.encode <cosod.pipeline.Pipeline.encode>` returns them; no backbone pass is made), its images
and the corrected masks of some of its members. Output: masks and scores for the other members.

    corrected masks -> token grid: each cell's foreground fraction f in [0, 1] (as fine-tuning targets are
        made); every token of every corrected image is an exemplar (its L2-normalised token) labelled f
    -> map (default, ``maps="neighbours"``): per token t of an image to predict, the labels of its
       ``k`` = 20 most similar exemplars (cosine), averaged with weights softmax(cos / tau), tau = 0.1:
       p(t) = the foreground fraction of what t looks like in the corrections, in [0, 1]
    -> threshold 0.5: the exemplars' own decision boundary (t is more like corrected foreground than corrected
       background), instead of the adaptive threshold calibrated on stage-1 maps
    -> :meth:`Pipeline.masks_from_maps <cosod.pipeline.Pipeline.masks_from_maps>`: stage-2 region refinement
       with the corrections' foreground prototype P_fg (the f-weighted mean of the exemplars) as the group
       prototype, dense CRF, output size; so a propagated mask is post-processed like an unprompted one.

More corrections add exemplars: the map then covers more of the object's (and the background's) looks, which
is why the masks improve with each correction (``bench/propagate.py``); the prototypes alone barely move once
one correction is in. A corrected mask that is all False says "this image has no common object": all its
tokens are background exemplars (so whatever it shows with the other images, a recurring distractor, is
pushed out). With no corrected foreground at all there is nothing to propagate
(:attr:`Propagation.propagated` is False and no mask is made).

``maps="prototype"`` keeps the first design, measured against it in the benchmark: ``s = cos(t, P_fg) -
cos(t, P_bg)`` (P_bg: the (1 - f)-weighted mean), min-max normalised per image and passed through stage 1's
transfer sigmoid((r - 0.65) / 0.15), then the pipeline's adaptive threshold. One mean vector per side cannot
use what a second correction adds, and the per-image min-max stretches any image to a foreground.

The exemplars live in the first backbone's token space (DINO), whatever the method: for UMS the region
refinement scores these tokens, not the network's enriched features. At most :data:`MAX_EXEMPLARS` exemplars
are used (evenly spaced over the corrected tokens), so memory stays bounded whatever the number of
corrections. The absence decision (:mod:`cosod.absence`) runs when the pipeline's ``config.absence`` is on,
or when asked.
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

NEIGHBOURS = 20  # exemplars each token is compared with
NEIGHBOUR_TAU = 0.1  # softmax temperature over their cosines
MAX_EXEMPLARS = 16384  # corrected tokens kept as exemplars (evenly spaced over them beyond this)
MAP_KINDS = ("neighbours", "prototype")


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
    timings: seconds: "prototype" (prototypes, exemplars and maps), then the pipeline's "refine", "crf",
        "resize", and "total".
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


def correction_exemplars(
    tokens: torch.Tensor, corrections: Mapping[int, np.ndarray], *, limit: int = MAX_EXEMPLARS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The corrected images' tokens as labelled exemplars: ``(E, C)`` unit vectors and ``(E,)`` foreground
    fractions in [0, 1], images in index order, cells in raster order; at most ``limit`` of them, evenly
    spaced (deterministic) when there are more."""
    grid = (int(tokens.shape[1]), int(tokens.shape[2]))
    c = int(tokens.shape[-1])
    vecs, labels = [], []
    for i in sorted(corrections):
        labels.append(mask_to_grid(np.asarray(corrections[i], dtype=bool), grid).clamp(0.0, 1.0).reshape(-1))
        vecs.append(_unit(tokens[i]).reshape(-1, c))
    if not vecs:
        return torch.zeros(0, c), torch.zeros(0)
    bank, lab = torch.cat(vecs), torch.cat(labels).float()
    if len(bank) > limit:
        keep = torch.linspace(0, len(bank) - 1, limit).round().long()
        bank, lab = bank[keep], lab[keep]
    return bank, lab


def neighbour_maps(
    tokens: torch.Tensor,
    exemplars: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int = NEIGHBOURS,
    tau: float = NEIGHBOUR_TAU,
) -> torch.Tensor:
    """(B, h, w, C) tokens -> (B, h, w) float32 maps in [0, 1]: per token, the softmax(cos / tau)-weighted
    mean label of its ``k`` most similar exemplars (:func:`correction_exemplars`). One image at a time, so
    memory is (h * w) x E floats. Raises ValueError without exemplars or without a foreground label."""
    if len(exemplars) == 0 or float(labels.max()) <= 0.0:
        raise ValueError("no corrected foreground: nothing to propagate")
    if k < 1 or tau <= 0:
        raise ValueError(f"k must be >= 1 and tau > 0, got {k} and {tau}")
    b, h, w, c = tokens.shape
    kk = min(int(k), len(exemplars))
    out = torch.empty(b, h, w)
    for i in range(b):
        sim = _unit(tokens[i]).reshape(-1, c) @ exemplars.T  # (h*w, E)
        top, idx = sim.topk(kk, dim=1)
        weights = torch.softmax(top / tau, dim=1)
        out[i] = (weights * labels[idx]).sum(dim=1).reshape(h, w)
    return out.clamp(0.0, 1.0).float()


@dataclass
class Exemplars:
    """What a group's corrections give every image to predict: the prototypes and the labelled exemplars
    (:func:`prepare`). A caller that propagates a group in parts prepares them once and passes them on."""

    prototypes: Prototypes
    bank: torch.Tensor
    labels: torch.Tensor


def prepare(feats: BackboneFeatures, corrections: Mapping[int, np.ndarray]) -> Exemplars:
    """:func:`correction_prototypes` and :func:`correction_exemplars` of a group's corrections."""
    tokens = feats.tokens.float()
    return Exemplars(correction_prototypes(tokens, corrections), *correction_exemplars(tokens, corrections))


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
    maps: str = "neighbours",
    prepared: Exemplars | None = None,
) -> Propagation:
    """Masks for the images of a group from the corrected masks of some of them (module docstring).

    pipeline: gives the threshold mode and constants, refinement, CRF settings and CRF workers (its backbone
        is not run). feats: the group's features from ``pipeline.encode(images)`` (the first backbone), B
        images in the order of ``images``. images: B HxWx3 uint8 RGB arrays (the CRF's input and the output
        sizes). corrections: index -> bool HxW mask at that image's size; all False = "no common object".
    targets: the indices to propagate to (default: every image without a correction, in order). absence:
        run the absence decision over the targets (None: ``pipeline.config.absence``). maps: "neighbours"
        (the exemplars' labels and threshold 0.5) or "prototype" (the first design); module docstring.
        prepared: :func:`prepare` of these ``feats`` and ``corrections``, when the caller made it already.

    Raises ValueError naming a bad image, mask, index or feature shape.
    """
    t0 = time.perf_counter()
    if not isinstance(maps, str) or maps not in MAP_KINDS:
        got = repr(maps[:40]) if isinstance(maps, str) else type(maps).__name__
        raise ValueError(f"maps must be one of {', '.join(MAP_KINDS)}, got {got}")
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
    ex = prepared if prepared is not None else prepare(feats, corrections)
    protos = ex.prototypes
    result = Propagation(targets=targets, prototypes=protos)
    if protos.foreground is None or not targets:
        result.timings = {"total": time.perf_counter() - t0}
        return result
    tokens = feats.tokens[targets].float()  # a float16 cache: refinement scores in float32
    thresholds = None
    if maps == "neighbours":
        grid_maps = neighbour_maps(tokens, ex.bank, ex.labels)
        thresholds = torch.full((len(targets),), 0.5)
    else:
        grid_maps = prototype_maps(tokens, protos)
    model_maps = ModelMaps(upsample(grid_maps, pipeline.config.input_size), tokens, grid_maps, targets)
    t1 = time.perf_counter()
    pred = pipeline.masks_from_maps(
        [images[i] for i in targets],
        model_maps,
        prototype=protos.foreground,
        absence=absence,
        thresholds=thresholds,
    )
    pred.mode = "propagated"
    result.prediction = pred
    result.masks = dict(zip(targets, pred.masks, strict=True))
    result.scores = dict(zip(targets, pred.scores, strict=True))
    result.propagated = True
    result.timings = {"prototype": t1 - t0, **pred.timings, "total": time.perf_counter() - t0}
    return result
