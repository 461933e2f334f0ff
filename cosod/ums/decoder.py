"""UMS-CoSOD decoder: F_enrich at patch resolution -> saliency logits at image resolution (method_spec B.6).

The paper does not describe its decoder; this is the DCFM-style top-down head without CNN laterals (a ViT is
single-scale) that the spec proposes:

    GroupNorm(F_enrich)       the FRAM output reaches ~1e6, so normalise first
    top: Conv1x1(C -> w), ReLU, Conv1x1(w -> w)
    3 x: bilinear x2 -> EnLayer (Conv3x3, ReLU, Conv3x3)
                     -> DSLayer side head (Conv3x3, ReLU, Conv3x3, ReLU, Conv1x1 -> 1)

so a 28x28 grid (ViT-B/8 at 224) gives 224x224 logits. The last side head's output is the final prediction;
the earlier ones, upsampled bilinearly to the final size, serve deep supervision.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WIDTH = 64
STEPS = 3
NORM_GROUPS = 32


def _conv3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1)


class EnLayer(nn.Sequential):
    """Conv3x3 -> ReLU -> Conv3x3, width -> width, same spatial size."""

    def __init__(self, width: int):
        super().__init__(_conv3(width, width), nn.ReLU(inplace=True), _conv3(width, width))


class DSLayer(nn.Sequential):
    """Side head: Conv3x3 -> ReLU -> Conv3x3 -> ReLU -> Conv1x1(width -> 1); logits, same spatial size."""

    def __init__(self, width: int):
        super().__init__(
            _conv3(width, width),
            nn.ReLU(inplace=True),
            _conv3(width, width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 1, kernel_size=1),
        )


class Decoder(nn.Module):
    """(B, dim, h, w) float -> (final logits (B, 1, h*2^steps, w*2^steps), side logits list).

    Args:
        dim: input channels C.
        width: decoder width (64 as in DCFM).
        steps: number of x2 upsamplings (3: patch 8 -> pixels).
        norm_groups: GroupNorm groups at the input; the largest divisor of ``dim`` not above it is used
            (32 for C = 768, 24 for C = 48, 32 for C = 32).

    ``side_logits`` holds the ``steps - 1`` earlier side predictions, each upsampled bilinearly to the final
    size (unbounded logits). ``forward`` returns ``(logits, side_logits)``.
    """

    def __init__(self, dim: int, width: int = WIDTH, steps: int = STEPS, norm_groups: int = NORM_GROUPS):
        super().__init__()
        for name, value in (("dim", dim), ("width", width), ("steps", steps), ("norm_groups", norm_groups)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.dim = dim
        self.width = width
        self.steps = steps
        groups = max(g for g in range(1, min(norm_groups, dim) + 1) if dim % g == 0)
        self.norm = nn.GroupNorm(groups, dim)
        self.top = nn.Sequential(nn.Conv2d(dim, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, width, 1))
        self.enlayers = nn.ModuleList(EnLayer(width) for _ in range(steps))
        self.dslayers = nn.ModuleList(DSLayer(width) for _ in range(steps))

    @property
    def scale(self) -> int:
        """Output size / input size."""
        return int(math.pow(2, self.steps))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"Decoder({self.dim}) expects (B, {self.dim}, h, w), got {tuple(x.shape)}")
        out_size = (x.shape[2] * self.scale, x.shape[3] * self.scale)
        p = self.top(self.norm(x))
        preds = []
        for enlayer, dslayer in zip(self.enlayers, self.dslayers, strict=True):
            p = F.interpolate(p, scale_factor=2.0, mode="bilinear", align_corners=False)
            p = enlayer(p)
            preds.append(dslayer(p))
        sides = [
            F.interpolate(pred, size=out_size, mode="bilinear", align_corners=False) for pred in preds[:-1]
        ]
        return preds[-1], sides
