"""UMS-CoSOD checkpoints: the network, the backbones it was trained on, and its own mean uncertainty B_bar.

B_bar (the mean of ``1 - conf`` over the training images, with the per-map confidence of RRBE) belongs to the
model: SCoSPARC's 0.48 describes differently distributed maps (method_spec B.9), so each UMS checkpoint
carries the value measured on its own training set, and inference reads it from here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import torch_load_dict, torch_save_atomic
from ..errors import CheckpointError
from .net import UMSNet

UMS_FORMAT = "cosod.ums"


@dataclass
class UMSCheckpoint:
    net: UMSNet
    backbone: str
    v2_backbone: str
    bm_bar: float
    config: dict[str, Any] = field(default_factory=dict)
    data_ids: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    parent: str | None = None
    code_version: str = __version__
    created: float = field(default_factory=time.time)


def save_ums(ckpt: UMSCheckpoint, path: str | os.PathLike[str]) -> Path:
    """Write atomically; everything needed to rebuild and audit the model travels with the weights."""
    return torch_save_atomic(
        {
            "format": UMS_FORMAT,
            "format_version": 1,
            "state_dict": ckpt.net.state_dict(),
            "net_config": dict(ckpt.net.config),
            "backbone": ckpt.backbone,
            "v2_backbone": ckpt.v2_backbone,
            "bm_bar": float(ckpt.bm_bar),
            "config": ckpt.config,
            "data_ids": list(ckpt.data_ids),
            "metrics": ckpt.metrics,
            "parent": ckpt.parent,
            "code_version": ckpt.code_version,
            "created": ckpt.created,
        },
        path,
    )


def load_ums(path: str | os.PathLike[str]) -> UMSCheckpoint:
    p = Path(path)
    raw = torch_load_dict(p, "UMS checkpoint")
    if raw.get("format") != UMS_FORMAT:
        raise CheckpointError(f"{p} is not a UMS checkpoint (written by `cosod train --model ums`)")
    net = UMSNet(**raw["net_config"])
    try:
        net.load_state_dict(raw["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{p}: state dict does not fit UMSNet({raw['net_config']}): {exc}") from exc
    return UMSCheckpoint(
        net=net.eval(),
        backbone=str(raw["backbone"]),
        v2_backbone=str(raw["v2_backbone"]),
        bm_bar=float(raw["bm_bar"]),
        config=dict(raw.get("config") or {}),
        data_ids=list(raw.get("data_ids") or []),
        metrics=dict(raw.get("metrics") or {}),
        parent=raw.get("parent"),
        code_version=str(raw.get("code_version", "")),
        created=float(raw.get("created", 0.0)),
    )
