"""UMS-CoSOD AFMM: per-patch adaptive mixing of DINO and DINOv2 tokens, then self-attention (method_spec B.3).

    F_v2  <- bilinear upsample of the DINOv2 grid to the DINO grid (and a Linear v2_dim -> dim if they differ)
    w     = sigmoid(Linear(ReLU(Linear([F_dino ; F_v2]))))         one scalar per patch, in (0, 1)
    F_dyn = w * F_dino + (1 - w) * F_v2
    F_fused = LayerNorm(F_dyn + MHA(F_dyn, F_dyn, F_dyn))            4 heads, per image over its own patches

The paper has both backbones at C = 768, so no projection exists there; ``v2_dim != dim`` adds a
``Linear(v2_dim, dim)`` on the DINOv2 tokens (our extension, e.g. for ViT-S DINO with ViT-B DINOv2). The
projection is applied before the upsampling (both are linear maps whose weights sum to 1, so the order does
not change the result, and projecting the smaller grid is cheaper).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

HEADS = 4


def upsample_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of (B, h, w, C) tokens to (B, H, W, C); no-op on equal grids."""
    if tokens.dim() != 4:
        raise ValueError(f"tokens must be (B, h, w, C), got shape {tuple(tokens.shape)}")
    if tuple(tokens.shape[1:3]) == tuple(grid):
        return tokens
    x = F.interpolate(tokens.permute(0, 3, 1, 2), size=tuple(grid), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)


class AFMM(nn.Module):
    """Adaptive Feature Mixer Module.

    Args:
        dim: channel count C of the DINO tokens (and of the output).
        v2_dim: channel count of the DINOv2 tokens; default ``dim`` (no projection).
        hidden: width of the weight net's hidden layer; default ``dim // 4`` (192 for C = 768).
        heads: attention heads; ``dim`` must be divisible by it (4 in the paper).

    ``forward(dino (B, h, w, C), v2 (B, h2, w2, C2)) -> (B, C, h, w)`` float. The last per-patch mixing
    weights ``w`` (B, h, w) in (0, 1), detached, are kept on ``last_weights`` for inspection.
    """

    def __init__(self, dim: int, v2_dim: int | None = None, hidden: int | None = None, heads: int = HEADS):
        super().__init__()
        v2_dim = dim if v2_dim is None else v2_dim
        hidden = max(1, dim // 4) if hidden is None else hidden
        for name, value in (("dim", dim), ("v2_dim", v2_dim), ("hidden", hidden), ("heads", heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim = dim
        self.v2_dim = v2_dim
        self.hidden = hidden
        self.heads = heads
        self.v2_proj: nn.Module = nn.Linear(v2_dim, dim) if v2_dim != dim else nn.Identity()
        self.weight_net = nn.Sequential(
            nn.Linear(2 * dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1), nn.Sigmoid()
        )
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.last_weights: torch.Tensor | None = None

    def mix(self, dino_tokens: torch.Tensor, v2_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F_dyn (B, h, w, C) and the mixing weights w (B, h, w) in (0, 1)."""
        self._check(dino_tokens, v2_tokens)
        b, h, w, _ = dino_tokens.shape
        v2 = upsample_tokens(self.v2_proj(v2_tokens), (h, w))
        weight = self.weight_net(torch.cat([dino_tokens, v2], dim=-1))  # (B, h, w, 1)
        f_dyn = weight * dino_tokens + (1 - weight) * v2
        return f_dyn, weight.squeeze(-1)

    def forward(self, dino_tokens: torch.Tensor, v2_tokens: torch.Tensor) -> torch.Tensor:
        f_dyn, weight = self.mix(dino_tokens, v2_tokens)
        self.last_weights = weight.detach()
        b, h, w, c = f_dyn.shape
        seq = f_dyn.reshape(b, h * w, c)
        attended, _ = self.attn(seq, seq, seq, need_weights=False)
        fused = self.norm(seq + attended)  # (B, N, C)
        return fused.transpose(1, 2).reshape(b, c, h, w)

    def _check(self, dino_tokens: torch.Tensor, v2_tokens: torch.Tensor) -> None:
        if dino_tokens.dim() != 4 or dino_tokens.shape[-1] != self.dim:
            raise ValueError(f"dino_tokens must be (B, h, w, {self.dim}), got {tuple(dino_tokens.shape)}")
        if v2_tokens.dim() != 4 or v2_tokens.shape[-1] != self.v2_dim:
            raise ValueError(f"v2_tokens must be (B, h2, w2, {self.v2_dim}), got {tuple(v2_tokens.shape)}")
        if dino_tokens.shape[0] != v2_tokens.shape[0]:
            raise ValueError(
                f"batch sizes differ: dino_tokens {dino_tokens.shape[0]} vs v2_tokens {v2_tokens.shape[0]}"
            )
        if not (dino_tokens.is_floating_point() and v2_tokens.is_floating_point()):
            raise ValueError(f"tokens must be float, got {dino_tokens.dtype} and {v2_tokens.dtype}")
