"""SCoSPARC as a :class:`~cosod.methods.base.Method`: one DINO backbone, the stage-1 head
(:class:`~cosod.scosparc.Stage1Net`, the network, losses and checkpoints stay in :mod:`cosod.scosparc`).

- head: a ``Stage1Net`` (tokens (B, h, w, C) -> maps (B, h, w)); checkpoint:
  ``PipelineConfig.stage1_checkpoint`` (ours or the official format), else ``stage1_init`` ("identity":
  training-free; "seeded": random, seed 123).
- maps: the stage-1 maps at the token grid, upsampled bilinearly to the working size; one image: its own
  saliency ``sigmoid((A - 0.65) / 0.15)`` from the head-mean CLS attention A.
- threshold: one per group (SCoSPARC code), B_bar 0.48.
- training (method_spec A.4): ``L_cooc + 0.3 L_sal``, no labels; 150 epochs, Adam weight decay 1e-4, betas
  (0.9, 0.99). Fine-tuning: ``w_ss (L_cooc + 0.3 L_sal) + w_sup (BCE + soft IoU)``, the supervised term on the
  corrected images' grid maps against the correction box-averaged to the grid (a fraction in [0, 1]).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..backbones import Backbone, BackboneFeatures
from ..refine import upsample
from ..scosparc import Stage1Checkpoint, Stage1Net, load_stage1, save_stage1, stage1_loss
from .base import (
    Batch,
    HeadRecord,
    LossWeights,
    MakeBackbone,
    Method,
    ModelMaps,
    TrainDefaults,
    TrainGroup,
    choose_references,
    reference_mask,
)

if TYPE_CHECKING:
    from ..data import Group
    from ..features import FeatureCache
    from ..pipeline import PipelineConfig
    from ..train import TrainConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def stage1_maps(
    net: Stage1Net, feats: BackboneFeatures, hashes: Sequence[str], *, max_refs: int, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """(B, h, w) float32 CPU soft maps and the reference indices used. One image: its saliency."""
    n = len(feats)
    if n == 1:
        return torch.sigmoid((feats.cls_attention - net.thresh) / net.temperature), [0]
    refs = choose_references(hashes, max_refs)
    maps = net(feats.tokens.to(device), reference_mask(n, refs), chunk=16)
    return maps.float().cpu(), refs


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """bool HxW -> float32 (h, w): the foreground fraction of each grid cell (box average over the image
    squashed to the grid, as the backbone squashes the image to its input size)."""
    img = Image.fromarray(mask.astype(np.float32))
    return torch.from_numpy(np.array(img.resize((grid[1], grid[0]), Image.Resampling.BOX), dtype=np.float32))


def supervised_terms(maps: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and soft IoU (mean over images of ``1 - sum(PY) / (sum P + sum Y - sum PY)``) of maps (B, h, w)
    in (0, 1) against targets (B, h, w) in [0, 1]."""
    p = maps.float().clamp(1e-6, 1 - 1e-6)
    y = target.float()
    bce = F.binary_cross_entropy(p, y)
    inter = (p * y).flatten(1).sum(1)
    union = p.flatten(1).sum(1) + y.flatten(1).sum(1) - inter
    return bce, (1.0 - inter / (union + 1e-5)).mean()


class SCoSPARC(Method):
    """SCoSPARC (method_spec A): frozen DINO + stage-1 cross-image attention head."""

    name = "scosparc"
    n_backbones = 1
    threshold = "group"
    train_defaults = TrainDefaults(epochs=150, weight_decay=1e-4, betas=(0.9, 0.99))
    checkpoint_field = "stage1_checkpoint"
    fills_uncorrected = False
    finetune_reversed = True

    def build(self, config: PipelineConfig, make_backbone: MakeBackbone) -> tuple[Any, list[Backbone]]:
        backbone = make_backbone(config.backbone)
        if config.stage1_checkpoint:
            head = load_stage1(config.stage1_checkpoint).net
        elif config.stage1_init == "identity":
            head = Stage1Net.identity(backbone.embed_dim)
        else:
            head = Stage1Net.seeded(backbone.embed_dim)
        return head, [backbone]

    def module(self, head: Any) -> nn.Module:
        if not isinstance(head, Stage1Net):
            raise TypeError(f"a SCoSPARC head is a Stage1Net, got {type(head).__name__}")
        return head

    def check(self, head: Any, backbones: Sequence[Backbone]) -> None:
        (backbone,) = backbones
        if head.dim != backbone.embed_dim:
            raise ValueError(
                f"stage-1 model has dim {head.dim} but backbone {backbone.spec.name} "
                f"gives {backbone.embed_dim}"
            )

    def load_head(self, path: str | os.PathLike[str]) -> Any:
        return load_stage1(path).net

    def save_head(
        self, head: Any, path: str | os.PathLike[str], record: HeadRecord, backbones: Sequence[Backbone]
    ) -> Stage1Checkpoint:
        ckpt = Stage1Checkpoint(
            net=head.cpu(),
            backbone=backbones[0].spec.name,
            config=record.config,
            data_ids=record.data_ids,
            metrics=record.metrics,
            parent=record.parent,
        )
        save_stage1(ckpt, path)
        return ckpt

    def maps(
        self,
        head: Any,
        feats: Sequence[BackboneFeatures],
        hashes: Sequence[str],
        *,
        max_refs: int,
        size: int,
        device: torch.device,
    ) -> ModelMaps:
        grid_maps, refs = stage1_maps(head, feats[0], hashes, max_refs=max_refs, device=device)
        return ModelMaps(upsample(grid_maps, size), feats[0].tokens, grid_maps, refs)

    def loss(
        self, module: nn.Module, batch: Batch, weights: LossWeights
    ) -> tuple[torch.Tensor, dict[str, float]]:
        dev = next(module.parameters()).device
        sub = batch.feats[0]
        tokens = sub.tokens.to(dev)
        maps = module(tokens)
        if batch.targets is None:
            terms = stage1_loss(tokens, sub.cls_attention.to(dev), maps, weights.saliency)
            return terms.total, terms.as_dict()
        ss = stage1_loss(tokens, sub.cls_attention.to(dev), maps, weights.saliency).total
        target = batch.targets.to(dev)
        labelled = (
            torch.ones(len(batch), dtype=torch.bool) if batch.labelled is None else batch.labelled
        ).to(dev)
        if bool(labelled.any()):
            bce, iou = supervised_terms(maps[labelled], target[labelled])
        else:
            bce = iou = maps.sum() * 0.0
        loss = weights.self_supervised * ss + weights.supervised * (bce + iou)
        return loss, {
            "loss": float(loss.detach()),
            "self_supervised": float(ss.detach()),
            "bce": float(bce.detach()),
            "iou_loss": float(iou.detach()),
        }

    def targets(
        self, masks: Sequence[np.ndarray | None], feats: Sequence[BackboneFeatures], size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = feats[0].grid
        tgt = torch.zeros(len(masks), *grid)
        has = torch.zeros(len(masks), dtype=torch.bool)
        for row, m in enumerate(masks):
            if m is not None:
                tgt[row], has[row] = mask_to_grid(m, grid), True
        return tgt, has

    def train_backbones(self, config: TrainConfig) -> tuple[str, ...]:
        return (config.backbone,)

    def prepare_training(
        self,
        groups: Sequence[Group],
        backbones: Sequence[Backbone],
        cache: FeatureCache,
        config: TrainConfig,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[TrainGroup], list[str]]:
        from ..train import encode_groups

        encoded = encode_groups(groups, backbones[0], cache, progress=progress)
        for g in encoded:
            if len(g.hashes) < 2:
                log.warning(
                    "group %s has %d readable image(s); training needs 2 or more, skipped",
                    g.name,
                    len(g.hashes),
                )
        usable = [TrainGroup(g.name, g.hashes) for g in encoded if len(g.hashes) >= 2]
        return usable, [p for g in encoded for p in g.skipped]

    def new_head(self, backbones: Sequence[Backbone], config: TrainConfig) -> Any:
        make = Stage1Net.identity if config.init == "identity" else Stage1Net.seeded
        return make(backbones[0].embed_dim).to(backbones[0].device)
