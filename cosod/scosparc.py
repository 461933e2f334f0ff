"""SCoSPARC stage 1: patch-level cross-image attention and its self-supervised losses (method_spec A.2-A.3).

The network is three 1x1 convolutions over the frozen backbone tokens:

    F_res = conv_a(F) + F;   Q = conv_q(F_res);   K = conv_k(F_res);   W = Q K^T / sqrt(C)

and the map of image i at patch p is the mean of row (i, p) of W over the columns of the *other* images,
min-max normalised per image and squashed with ``sigmoid((r - 0.65) / 0.15)``; range [0.01295, 0.9116].

Because there is no softmax, that mean equals ``q_i(p) . mean(keys of the other images) / sqrt(C)``: it is
computed here in O(B N C) instead of building the (B N)^2 matrix, with identical results (a test compares the
two). Each image can be restricted to a set of reference images (``ref_mask``) so large groups stay linear.

Official checkpoint names (``checkpoints/model_combined.pt``) map onto this module as follows:

    encoder_attn.conv.{weight,bias}             -> residual.{weight,bias}
    encoder_attn.query_transform.{weight,bias}  -> query.{weight,bias}
    encoder_attn.key_transform.{weight,bias}    -> key.{weight,bias}
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .atomic import torch_load_dict, torch_save_atomic
from .errors import CheckpointError

THRESH = 0.65
TEMPERATURE = 0.15
SALIENCY_WEIGHT = 0.3
SEED = 123
CHECKPOINT_FORMAT = "cosod.stage1"

OFFICIAL_KEY_MAP = {
    "encoder_attn.conv.": "residual.",
    "encoder_attn.query_transform.": "query.",
    "encoder_attn.key_transform.": "key.",
}


class Stage1Net(nn.Module):
    """SCoSPARC's ``Encoder_Attentioner``: tokens of a group -> one co-attention map per image.

    Built with PyTorch's default initialisation under seed 123, as the official training starts.
    :meth:`identity` gives the training-free variant (no residual conv, Q = K = F), used when no
    trained checkpoint is configured.
    """

    def __init__(self, dim: int = 768, thresh: float = THRESH, temperature: float = TEMPERATURE):
        super().__init__()
        self.dim = dim
        self.thresh = thresh
        self.temperature = temperature
        self.residual = nn.Conv2d(dim, dim, 1)
        self.query = nn.Conv2d(dim, dim, 1)
        self.key = nn.Conv2d(dim, dim, 1)

    @classmethod
    def seeded(cls, dim: int, seed: int = SEED, **kw: Any) -> Stage1Net:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(dim, **kw)

    @classmethod
    def identity(cls, dim: int, **kw: Any) -> Stage1Net:
        net = cls(dim, **kw)
        with torch.no_grad():
            eye = torch.eye(dim).reshape(dim, dim, 1, 1)
            nn.init.zeros_(net.residual.weight)
            for conv in (net.residual, net.query, net.key):
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
            for conv in (net.query, net.key):
                conv.weight.copy_(eye)
        return net

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w, C) tokens -> queries and keys, each (B, N, C) with N = h*w."""
        x = tokens.permute(0, 3, 1, 2)
        x = self.residual(x) + x
        q = self.query(x).flatten(2).transpose(1, 2)
        k = self.key(x).flatten(2).transpose(1, 2)
        return q, k

    def scores(
        self, tokens: torch.Tensor, ref_mask: torch.Tensor | None = None, chunk: int | None = None
    ) -> torch.Tensor:
        """Raw cross-image scores r, (B, N): each patch's mean attention logit over the reference images'
        patches. ``ref_mask`` (B, B) bool says which images each image compares with (its own row is
        ignored); default: all the others. ``chunk`` projects that many images at a time (bounded memory)."""
        b = tokens.shape[0]
        refs = _reference_matrix(b, ref_mask, tokens.device)
        counts = refs.sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError("every image needs at least one other image to compare with (group of 1?)")
        step = chunk or b
        parts = [self.project(tokens[i : i + step]) for i in range(0, b, step)]
        q = torch.cat([p[0] for p in parts])
        key_sums = torch.cat([p[1].sum(dim=1) for p in parts])  # (B, C)
        n = q.shape[1]
        ref_mean = (refs.to(q.dtype) @ key_sums) / (counts.to(q.dtype)[:, None] * n)
        return torch.einsum("bnc,bc->bn", q, ref_mean) / math.sqrt(self.dim)

    def forward(
        self, tokens: torch.Tensor, ref_mask: torch.Tensor | None = None, chunk: int | None = None
    ) -> torch.Tensor:
        """(B, h, w, C) tokens -> (B, h, w) maps in [sigmoid(-thresh/temp), sigmoid((1-thresh)/temp)]."""
        b, h, w, _ = tokens.shape
        r = self.scores(tokens, ref_mask, chunk)
        lo = r.amin(dim=1, keepdim=True)
        hi = r.amax(dim=1, keepdim=True)
        r = (r - lo) / (hi - lo).clamp_min(1e-12)
        return torch.sigmoid((r - self.thresh) / self.temperature).reshape(b, h, w)


def _reference_matrix(b: int, ref_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    eye = torch.eye(b, dtype=torch.bool, device=device)
    if ref_mask is None:
        return ~eye
    if ref_mask.shape != (b, b):
        raise ValueError(f"ref_mask must be ({b}, {b}), got {tuple(ref_mask.shape)}")
    return ref_mask.to(device=device, dtype=torch.bool) & ~eye


# --- losses (train.py / utils.py of the official code) ---------------------------------------------


def region_embeddings(tokens: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background embeddings (B, C): sum_p w(p) x(p) / N and sum_p (1 - w(p)) x(p) / N."""
    x = tokens.flatten(1, 2)  # (B, N, C)
    w = maps.flatten(1)[..., None]  # (B, N, 1)
    n = x.shape[1]
    return (w * x).sum(dim=1) / n, ((1 - w) * x).sum(dim=1) / n


def cooccurrence_loss(fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """mean over pairs i<j of d_p / (d_p + d_n), d_p = exp(1 - cos(f_i, f_j)),
    d_n = exp(1 - (cos(f_i, b_i) + cos(f_j, b_j))). Zero for a group of one."""
    b = fg.shape[0]
    if b < 2:
        return fg.sum() * 0.0
    i, j = torch.triu_indices(b, b, offset=1, device=fg.device)
    own = F.cosine_similarity(fg, bg, dim=1)  # (B,)
    d_p = torch.exp(1 - F.cosine_similarity(fg[i], fg[j], dim=1))
    d_n = torch.exp(1 - (own[i] + own[j]))
    return (d_p / (d_p + d_n)).mean()


def saliency_loss(cls_attention: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """1 - mean over images and patches of SA * M (SA: min-max normalised head-mean CLS attention)."""
    return 1 - (cls_attention.flatten(1) * maps.flatten(1)).mean()


@dataclass
class Stage1Loss:
    total: torch.Tensor
    cooccurrence: torch.Tensor
    saliency: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "cooccurrence": float(self.cooccurrence.detach()),
            "saliency": float(self.saliency.detach()),
        }


def stage1_loss(
    tokens: torch.Tensor,
    cls_attention: torch.Tensor,
    maps: torch.Tensor,
    saliency_weight: float = SALIENCY_WEIGHT,
) -> Stage1Loss:
    """L = L_cooc + 0.3 * L_sal on a group's tokens (B, h, w, C), CLS attention (B, h, w), maps (B, h, w)."""
    fg, bg = region_embeddings(tokens, maps)
    cooc = cooccurrence_loss(fg, bg)
    sal = saliency_loss(cls_attention, maps)
    return Stage1Loss(cooc + saliency_weight * sal, cooc, sal)


# --- checkpoints --------------------------------------------------------------------------------------


@dataclass
class Stage1Checkpoint:
    """A stage-1 model with the record of how it was made (nanoGPT-style: rebuildable and auditable alone)."""

    net: Stage1Net
    backbone: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data_ids: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    code_version: str = __version__
    created: float = field(default_factory=time.time)
    source: str = "cosod"  # "cosod" or "official"


def save_stage1(ckpt: Stage1Checkpoint, path: str | os.PathLike[str]) -> Path:
    """Write atomically (temp file in the same folder, then rename)."""
    dest = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "state_dict": ckpt.net.state_dict(),
        "dim": ckpt.net.dim,
        "thresh": ckpt.net.thresh,
        "temperature": ckpt.net.temperature,
        "backbone": ckpt.backbone,
        "config": ckpt.config,
        "data_ids": list(ckpt.data_ids),
        "metrics": ckpt.metrics,
        "parent": ckpt.parent,
        "code_version": ckpt.code_version,
        "created": ckpt.created,
    }
    torch_save_atomic(payload, dest)
    return dest


def _from_official(sd: dict[str, Any], path: Path) -> Stage1Checkpoint:
    mapped: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.removeprefix("module.")
        for old, new in OFFICIAL_KEY_MAP.items():
            if k.startswith(old):
                mapped[new + k[len(old) :]] = value
                break
        else:
            if k.startswith("encoder_attn."):
                raise CheckpointError(f"{path}: unexpected stage-1 parameter {key!r}")
            # other keys (e.g. a saved backbone) are not part of stage 1
    expected = {f"{m}.{p}" for m in ("residual", "query", "key") for p in ("weight", "bias")}
    if set(mapped) != expected:
        raise CheckpointError(
            f"{path} is not a SCoSPARC stage-1 checkpoint: expected encoder_attn.{{conv,query_transform,"
            f"key_transform}}.{{weight,bias}}, found {sorted(sd)[:8]}"
        )
    dim = int(mapped["residual.weight"].shape[0])
    net = Stage1Net(dim)
    net.load_state_dict(mapped, strict=True)
    backbone = "vit_base_patch8_224.dino" if dim == 768 else None
    return Stage1Checkpoint(net=net, backbone=backbone, source="official", config={"file": str(path)})


def load_stage1(path: str | os.PathLike[str]) -> Stage1Checkpoint:
    """Read one of our checkpoints or an official SCoSPARC stage-1 state dict."""
    p = Path(path)
    raw = torch_load_dict(p, "stage-1 checkpoint")
    if raw.get("format") != CHECKPOINT_FORMAT:
        for wrapper in ("state_dict", "model"):
            if isinstance(raw.get(wrapper), dict):
                raw = raw[wrapper]
        return _from_official(raw, p)
    net = Stage1Net(int(raw["dim"]), thresh=float(raw["thresh"]), temperature=float(raw["temperature"]))
    try:
        net.load_state_dict(raw["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{p}: state dict does not fit Stage1Net({raw['dim']}): {exc}") from exc
    return Stage1Checkpoint(
        net=net,
        backbone=raw.get("backbone"),
        config=dict(raw.get("config") or {}),
        data_ids=list(raw.get("data_ids") or []),
        metrics=dict(raw.get("metrics") or {}),
        parent=raw.get("parent"),
        code_version=str(raw.get("code_version", "")),
        created=float(raw.get("created", 0.0)),
    )
