"""CM-SPLG: cross-modal self-supervised pseudo-labels for a group (UMS-CoSOD paper, method_spec B.2).

For every image of a group:

1. candidate instance masks come from MaskCut on the backbone's last-block keys (the stand-in for HASSOD,
   which needs Detectron2 and a checkpoint that cannot be fetched here);
2. the group's candidates are clustered into "categories" (HASSOD is class-agnostic, so the paper's category
   is resolved as a cluster): descriptor = L2-normalised mean token inside the mask, agglomerative clustering
   with cosine distance and average linkage, cut at ``cluster_threshold`` (0.3);
3. a category's frequency f is the number of distinct images holding at least one of its masks; an image's
   mask for a category is the union of its masks in that category;
4. the image keeps its top ``k`` (3) categories by f, and of those the one whose mask overlaps most (IoU) with
   its binarised DINO CLS attention (the patches holding 60 % of the attention mass) is the pseudo-label.

Edge cases: no candidate overlaps the attention -> the most frequent candidate; an image without any
candidate -> the binarised attention itself (``source == "attention"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage

from .backbones import BackboneFeatures
from .metrics import iou

log = logging.getLogger(__name__)

TOP_K = 3
ATTENTION_MASS = 0.6
CLUSTER_THRESHOLD = 0.3


def attention_mask(attention: np.ndarray, mass: float = ATTENTION_MASS) -> np.ndarray:
    """Binarise a CLS-attention map (h, w) by keeping its strongest patches until they hold ``mass`` of the
    total (the DINO/LOST rule); the strongest patch is always kept."""
    a = np.asarray(attention, dtype=np.float64).ravel()
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    total = a.sum()
    keep = np.zeros(a.size, dtype=bool)
    order = np.argsort(-a, kind="stable")
    if total <= 0:
        keep[order[0]] = True
        return keep.reshape(np.shape(attention))
    before = np.concatenate([[0.0], np.cumsum(a[order])[:-1]]) / total  # mass of the stronger patches
    keep[order[before < mass]] = True
    return keep.reshape(np.shape(attention))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; 0 when both are empty (:func:`cosod.metrics.iou`)."""
    return iou(np.asarray(a, dtype=bool), np.asarray(b, dtype=bool), empty=0.0)


def mask_descriptor(tokens: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """L2-normalised mean token (C,) inside a grid mask (h, w)."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    v = tokens[m].mean(dim=0).double().numpy()
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def cluster_masks(descriptors: np.ndarray, threshold: float = CLUSTER_THRESHOLD) -> np.ndarray:
    """Category id per mask (M,), from agglomerative clustering (cosine distance, average linkage)."""
    if len(descriptors) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(descriptors) == 1:
        return np.zeros(1, dtype=np.int64)
    z = linkage(np.asarray(descriptors, dtype=np.float64), method="average", metric="cosine")
    return fcluster(z, t=threshold, criterion="distance").astype(np.int64) - 1


@dataclass
class PseudoLabel:
    """One image's pseudo-label at the token grid, and how it was chosen."""

    mask: np.ndarray  # (h, w) bool
    category: int | None  # None when it fell back to the attention mask
    frequency: int
    overlap: float
    source: str  # "category", "most-frequent" or "attention"


def select_pseudo_labels(
    candidates: Sequence[Sequence[np.ndarray]],
    categories: Sequence[Sequence[int]],
    attention_masks: Sequence[np.ndarray],
    *,
    k: int = TOP_K,
) -> list[PseudoLabel]:
    """The selection rule of steps 3-4 given each image's candidate masks, their category ids (same nesting)
    and each image's binarised attention (h, w). Ties in frequency keep the lower category id first."""
    if not (len(candidates) == len(categories) == len(attention_masks)):
        raise ValueError(
            f"got {len(candidates)} candidate lists, {len(categories)} category lists and "
            f"{len(attention_masks)} attention masks; they must match"
        )
    freq: dict[int, int] = {}
    for cats in categories:
        for c in set(cats):
            freq[c] = freq.get(c, 0) + 1
    out = []
    for masks, cats, sa in zip(candidates, categories, attention_masks, strict=True):
        if len(masks) != len(cats):
            raise ValueError(f"{len(masks)} masks but {len(cats)} category ids for one image")
        if not masks:
            out.append(PseudoLabel(np.asarray(sa, dtype=bool), None, 0, 1.0, "attention"))
            continue
        per_cat: dict[int, np.ndarray] = {}
        for m, c in zip(masks, cats, strict=True):
            per_cat[c] = per_cat.get(c, np.zeros_like(m, dtype=bool)) | np.asarray(m, dtype=bool)
        ranked = sorted(per_cat, key=lambda c: (-freq[c], c))[:k]
        overlaps = [mask_iou(per_cat[c], sa) for c in ranked]
        best = int(np.argmax(overlaps))
        if overlaps[best] > 0:
            c = ranked[best]
            out.append(PseudoLabel(per_cat[c], c, freq[c], overlaps[best], "category"))
        else:
            c = ranked[0]
            out.append(PseudoLabel(per_cat[c], c, freq[c], 0.0, "most-frequent"))
    return out


def group_pseudo_labels(
    feats: BackboneFeatures,
    *,
    n_masks: int = 3,
    tau: float = 0.15,
    k: int = TOP_K,
    cluster_threshold: float = CLUSTER_THRESHOLD,
) -> list[PseudoLabel]:
    """Pseudo-labels (token grid) for one group's backbone features (keys for MaskCut, tokens for the
    category descriptors, CLS attention for the overlap)."""
    from .discovery import maskcut

    candidates: list[list[np.ndarray]] = []
    descriptors: list[np.ndarray] = []
    owners: list[int] = []
    for i in range(len(feats)):
        masks = [m for m in maskcut(feats.keys[i], n_masks=n_masks, tau=tau) if m.any()]
        candidates.append(masks)
        for m in masks:
            descriptors.append(mask_descriptor(feats.tokens[i], m))
            owners.append(i)
    ids = cluster_masks(np.stack(descriptors) if descriptors else np.zeros((0, 1)), cluster_threshold)
    categories: list[list[int]] = [[] for _ in range(len(feats))]
    for owner, cid in zip(owners, ids, strict=True):
        categories[owner].append(int(cid))
    sa = [attention_mask(feats.cls_attention[i].numpy()) for i in range(len(feats))]
    return select_pseudo_labels(candidates, categories, sa, k=k)


def pseudo_label_masks(
    images: Sequence[np.ndarray],
    feats: BackboneFeatures,
    *,
    size: int | None = None,
    crf: bool = True,
    **selection: Any,
) -> tuple[list[np.ndarray], list[PseudoLabel]]:
    """Pseudo-label masks for a group: bool HxW at each image's original size, or SxS when ``size`` is
    given (the image is then resized to SxS first, as the network sees it). Grid masks are upsampled
    (nearest) and, with ``crf``, snapped to image edges by the dense CRF of :mod:`cosod.refine`."""
    from PIL import Image

    from .discovery import upsample_mask
    from .refine import crf_refine, output_map

    labels = group_pseudo_labels(feats, **selection)
    masks = []
    for img, lab in zip(images, labels, strict=True):
        if size is not None:
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
        up = upsample_mask(lab.mask, img.shape[:2])
        if crf:  # at the image's own aspect ratio (these are not SCoSPARC's outputs), back at its size
            try:
                up = output_map(crf_refine(img, up, aspect="keep", uniform="keep"), img.shape[:2]) > 127
            except Exception as exc:  # pydensecrf raises plain Exceptions on bad inputs
                log.warning("dense CRF failed (%s); using the pseudo-label without CRF", exc)
        masks.append(up)
    return masks, labels
