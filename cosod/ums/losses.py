"""UMS-CoSOD training loss: BCE + soft IoU against binary pseudo-labels (method_spec B.7, paper eq. 9-10).

    P = sigmoid(logits),  Y in [0, 1]
    L_bce = mean over all pixels of BCE(P, Y)
    L_iou = mean over images of 1 - sum(P Y) / (sum P + sum Y - sum P Y + 1e-5)       (DCFM's IoU loss)
    L     = L_bce + L_iou

Targets are resized (nearest) to the logits' size when they differ. With ``side_logits`` the same loss is
summed over the side outputs too (deep supervision as in DCFM/CFPAM). Everything is computed in fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IOU_EPS = 1e-5


@dataclass
class LossTerms:
    """Scalar tensors: ``total`` (differentiable) and its parts summed over the supervised outputs."""

    total: torch.Tensor
    bce: torch.Tensor
    iou: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "bce": float(self.bce.detach()),
            "iou": float(self.iou.detach()),
        }


def prepare_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) bool/float target in [0, 1] -> float32 (B, 1, *size), nearest resize."""
    if target.dim() == 3:
        target = target.unsqueeze(1)
    if target.dim() != 4 or target.shape[1] != 1:
        raise ValueError(f"target must be (B, H, W) or (B, 1, H, W), got {tuple(target.shape)}")
    y = target.float()
    lo, hi = float(y.min()), float(y.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"target values must lie in [0, 1], got range [{lo}, {hi}] (a 0/255 mask? divide by 255)"
        )
    if tuple(y.shape[2:]) != tuple(size):
        y = F.interpolate(y, size=tuple(size), mode="nearest")
    return y


def _terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be (B, 1, H, W), got {tuple(logits.shape)}")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"batch sizes differ: logits {logits.shape[0]} vs target {target.shape[0]}")
    x = logits.float()
    y = prepare_target(target, (x.shape[2], x.shape[3]))
    bce = F.binary_cross_entropy_with_logits(x, y)
    p = torch.sigmoid(x)
    inter = (p * y).sum(dim=(1, 2, 3))
    union = p.sum(dim=(1, 2, 3)) + y.sum(dim=(1, 2, 3)) - inter
    iou = (1.0 - inter / (union + IOU_EPS)).mean()
    return bce, iou


def bce_iou_terms(
    logits: torch.Tensor, target: torch.Tensor, side_logits: Sequence[torch.Tensor] | None = None
) -> LossTerms:
    """BCE + IoU of ``logits`` (B, 1, H, W) and of every side output against ``target``; see module doc."""
    bce, iou = _terms(logits, target)
    for side in side_logits or ():
        b, i = _terms(side, target)
        bce = bce + b
        iou = iou + i
    return LossTerms(total=bce + iou, bce=bce, iou=iou)


def bce_iou_loss(
    logits: torch.Tensor, target: torch.Tensor, side_logits: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """L_bce + L_iou, a scalar fp32 tensor >= 0 (summed over ``side_logits`` too when given).

    Args:
        logits: (B, 1, H, W) raw network outputs (any float dtype).
        target: (B, H', W') or (B, 1, H', W') pseudo-labels in [0, 1] (bool or float), resized nearest to
            (H, W).
        side_logits: optional list of (B, 1, H_s, W_s) side outputs for deep supervision.
    """
    return bce_iou_terms(logits, target, side_logits).total
