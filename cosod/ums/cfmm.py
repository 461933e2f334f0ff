"""UMS-CoSOD CFMM: group consensus by key points and response maps (method_spec B.4 = DCFM's ``AttLayer``).

For a group of B images, X (B, C, H, W), N = H*W:

    F_res  = conv_a(X) + X
    S[b,p] = mean_k max_q  <Q(b,p), K(k,q)> / sqrt(C)          (each image k includes b itself)
    F_lm   = softmax_p S[b, :]                                   (monotone: only its argmax matters)
    KP_b   = sum of L2-normalised F_res at the argmax of F_lm[b]  (summed over exact ties)
    RM     = <Fn(b,p), KP_k>  -> (B, B, H, W); ReLU in eval mode only
    R      = min-max_p( mean_k RM[b,k] )  with 1e-12             (B, 1, H, W) in [0, 1]
    F_comp = mean over (b, p) of F_res * R                        (1, C, 1, 1), the group prototype
    F_merged = F_res * F_comp + F_res * R

The (B N) x (B N) affinity is never held at once: it is built ``chunk_elements`` entries at a time and reduced
to its per-image row maxima immediately (``torch.max`` keeps only indices for backward), so memory stays
bounded for groups of 24 at 28x28. Parameter names: ``conv`` (residual), ``query_transform``,
``key_transform`` as in DCFM.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 24  # affinity entries per chunk (64 MB in fp32)


@dataclass
class CFMMOutput:
    """What CFMM computes for a group of B images on an H x W grid with C channels.

    merged: F_merged (B, C, H, W), the module's output.
    residual: F_res (B, C, H, W).
    prototype: F_comp (1, C, 1, 1).
    key_points: KP (B, C), L2 norm 1 (or a sum of unit vectors on exact ties).
    key_mask: (B, 1, H, W) float, 1 at each image's argmax of F_lm, else 0.
    importance: F_lm (B, H, W), softmax over each image's patches (sums to 1 per image).
    response_maps: RM (B, B, H, W); RM[b, k] = cosine of image b's patches with image k's key point
        (ReLU applied in eval mode).
    response: min-max normalised mean response (B, 1, H, W) in [0, 1].
    """

    merged: torch.Tensor
    residual: torch.Tensor
    prototype: torch.Tensor
    key_points: torch.Tensor
    key_mask: torch.Tensor
    importance: torch.Tensor
    response_maps: torch.Tensor
    response: torch.Tensor


def group_max_affinity(
    q: torch.Tensor, k: torch.Tensor, scale: float, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor:
    """S_max for queries q (B, N, C) and keys k (B, N, C): (B*N, B), the max over each image's N keys of
    ``scale * <q_i, k>``, computed in row chunks of about ``chunk_elements`` affinity entries."""
    if q.shape != k.shape or q.dim() != 3:
        raise ValueError(f"q and k must both be (B, N, C), got {tuple(q.shape)} and {tuple(k.shape)}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    b, n, c = q.shape
    rows = q.reshape(b * n, c)
    keys = k.reshape(b * n, c).t()  # (C, B*N), image-major
    step = max(1, chunk_elements // (b * n))
    parts = []
    for start in range(0, b * n, step):
        aff = (rows[start : start + step] @ keys) * scale  # (rows, B*N)
        parts.append(aff.view(-1, b, n).max(dim=-1).values)  # (rows, B)
    return torch.cat(parts, dim=0)


class CFMM(nn.Module):
    """Comprehensive Feature Mining Module: X (B, C, H, W) float -> :class:`CFMMOutput` (``.merged`` is the
    feature passed on). The batch must be one group: F_comp pools over the whole batch.

    All convs are 1x1 C -> C with bias. ``forward`` in training mode skips the ReLU on the response maps
    (as DCFM does); in eval mode it applies it.
    """

    def __init__(self, dim: int, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        self.dim = dim
        self.chunk_elements = int(chunk_elements)
        self.conv = nn.Conv2d(dim, dim, 1)
        self.query_transform = nn.Conv2d(dim, dim, 1)
        self.key_transform = nn.Conv2d(dim, dim, 1)
        self.scale = 1.0 / math.sqrt(dim)

    @classmethod
    def identity(cls, dim: int, **kw: int) -> CFMM:
        """Training-free variant: residual conv zeroed (F_res = X); Q, K identity convs with zero bias."""
        net = cls(dim, **kw)
        with torch.no_grad():
            for conv in (net.conv, net.query_transform, net.key_transform):
                for p in conv.parameters():
                    p.zero_()
            eye = torch.eye(dim).reshape(dim, dim, 1, 1)
            net.query_transform.weight.copy_(eye)
            net.key_transform.weight.copy_(eye)
        return net

    def forward(self, x: torch.Tensor) -> CFMMOutput:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"CFMM({self.dim}) expects (B, {self.dim}, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"CFMM expects a float tensor, got dtype {x.dtype}")
        b, c, h, w = x.shape
        f_res = self.conv(x) + x
        q = self.query_transform(f_res).flatten(2).transpose(1, 2)  # (B, N, C)
        k = self.key_transform(f_res).flatten(2).transpose(1, 2)
        s_max = group_max_affinity(q, k, self.scale, self.chunk_elements)  # (B*N, B)
        importance = torch.softmax(s_max.mean(dim=-1).view(b, h * w), dim=-1)  # (B, N)

        fn = F.normalize(f_res, dim=1)
        peak = importance.max(dim=-1, keepdim=True).values
        key_mask = (importance == peak).to(fn.dtype).view(b, 1, h, w)
        key_points = (fn * key_mask).sum(dim=(2, 3))  # (B, C)

        rm = torch.einsum("bchw,kc->bkhw", fn, key_points)
        if not self.training:
            rm = torch.relu(rm)
        mean_rm = rm.mean(dim=1).view(b, h * w)
        lo = mean_rm.min(dim=1, keepdim=True).values
        hi = mean_rm.max(dim=1, keepdim=True).values
        response = ((mean_rm - lo) / (hi - lo + 1e-12)).view(b, 1, h, w)

        x51 = f_res * response
        prototype = x51.mean(dim=(0, 2, 3), keepdim=True)
        merged = f_res * prototype + x51
        return CFMMOutput(
            merged=merged,
            residual=f_res,
            prototype=prototype,
            key_points=key_points,
            key_mask=key_mask,
            importance=importance.view(b, h, w),
            response_maps=rm,
            response=response,
        )
