"""UMS-CoSOD as a :class:`~cosod.methods.base.Method`: two backbones (DINO, then DINOv2) and the
:class:`~cosod.ums.net.UMSNet` head (the network, loss and checkpoints stay in :mod:`cosod.ums`).

- head: a :class:`~cosod.ums.checkpoint.UMSCheckpoint` (the net, the names of its two backbones, its B_bar);
  checkpoint: ``PipelineConfig.ums_checkpoint``, required (train one with ``cosod train --model ums``).
- maps: one forward per at most K images (CFMM mixes the batch): the K references alone, then the references
  plus chunks of at most K other images, so every image meets the same references; sigmoid of the logits at
  the net's output size (upsampled to the working size when it differs); FRAM's features as the prototype.
- threshold: one per map (UMS paper), B_bar measured on the checkpoint's training images.
- training (method_spec B.8): BCE + IoU on the final and side outputs against CM-SPLG pseudo-labels; 100
  epochs, Adam without weight decay, betas (0.9, 0.999); B_bar re-measured afterwards. Fine-tuning: the same
  loss, targets the corrections and, for uncorrected images, the active model's masks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..backbones import Backbone, BackboneFeatures
from ..metrics import iou
from ..refine import upsample
from .base import (
    Batch,
    HeadRecord,
    Loader,
    LossWeights,
    MakeBackbone,
    Method,
    ModelMaps,
    TrainDefaults,
    TrainGroup,
    choose_references,
)

if TYPE_CHECKING:
    from ..data import Group
    from ..features import FeatureCache
    from ..pipeline import PipelineConfig
    from ..train import TrainConfig

log = logging.getLogger(__name__)


def mask_to_square(mask: np.ndarray, size: int) -> torch.Tensor:
    """bool HxW -> float32 (size, size) 0/1 (nearest), the UMS network's output size."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(img) >= 128).astype(np.float32))


def _soft_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of the IoU of ``pred >= 0.5`` with ``target >= 0.5`` ((B, H, W) each; an empty
    pair counts 0), by :func:`cosod.metrics.iou`."""
    p = (pred >= 0.5).cpu().numpy()
    t = (target >= 0.5).cpu().numpy()
    return float(np.mean([iou(a, b, empty=0.0) for a, b in zip(p, t, strict=True)]))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def measure_bm_bar(net: nn.Module, load: Loader, n_groups: int, max_group: int = 24) -> float:
    """Mean of ``1 - conf`` over the images of ``load(0..n-1)``, with RRBE's per-map confidence
    (method_spec B.9), in chunks of at most ``max_group`` images."""
    from ..refine import map_confidences

    values = []
    net.eval()
    dev = next(net.parameters()).device
    for gi in range(n_groups):
        dino, v2 = load(gi).feats
        for start in range(0, len(dino), max_group):
            idx = list(range(start, min(start + max_group, len(dino))))
            maps = torch.sigmoid(net(dino.tokens[idx].to(dev), v2.tokens[idx].to(dev)).logits[:, 0])
            values.extend((1.0 - map_confidences(maps)).tolist())
    return float(np.mean(values))


class UMS(Method):
    """UMS-CoSOD (method_spec B): frozen DINO + DINOv2, AFMM -> CFMM -> FRAM -> decoder head."""

    name = "ums"
    n_backbones = 2
    threshold = "map"
    train_defaults = TrainDefaults(epochs=100, weight_decay=0.0, betas=(0.9, 0.999))
    checkpoint_field = "ums_checkpoint"
    checkpoint_required = True
    fills_uncorrected = True
    finetune_reversed = False

    def build(self, config: PipelineConfig, make_backbone: MakeBackbone) -> tuple[Any, list[Backbone]]:
        from ..ums.checkpoint import load_ums

        if not config.ums_checkpoint:
            raise ValueError(
                "model 'ums' needs a trained checkpoint (ums_checkpoint); train one with "
                "`cosod train --model ums`"
            )
        head = load_ums(config.ums_checkpoint)
        return head, [make_backbone(head.backbone), make_backbone(head.v2_backbone)]

    def module(self, head: Any) -> nn.Module:
        net = getattr(head, "net", None)
        if not isinstance(net, nn.Module):
            raise TypeError(f"a UMS head is a UMSCheckpoint, got {type(head).__name__}")
        return net

    def bm_bar(self, head: Any) -> float:
        return float(head.bm_bar)

    def load_head(self, path: str | os.PathLike[str]) -> Any:
        from ..ums.checkpoint import load_ums

        return load_ums(path)

    def save_head(
        self, head: Any, path: str | os.PathLike[str], record: HeadRecord, backbones: Sequence[Backbone]
    ) -> Any:
        from ..ums.checkpoint import save_ums

        ckpt = replace(
            head, parent=record.parent, config=record.config, data_ids=record.data_ids, metrics=record.metrics
        )
        save_ums(ckpt, path)
        return ckpt

    @torch.no_grad()
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
        dino, v2 = feats
        n = len(dino)
        refs = choose_references(hashes, max_refs)
        others = [i for i in range(n) if i not in set(refs)]
        batches = [refs] + [refs + chunk for chunk in _chunks(others, max_refs)]
        work: list[torch.Tensor | None] = [None] * n
        proto: list[torch.Tensor | None] = [None] * n
        for batch in batches:
            out = head.net(dino.tokens[batch].to(device), v2.tokens[batch].to(device))
            maps = torch.sigmoid(out.logits[:, 0]).float().cpu()
            enriched = out.enriched.permute(0, 2, 3, 1).float().cpu()
            for row, i in enumerate(batch):
                if work[i] is None:
                    work[i], proto[i] = maps[row], enriched[row]
        stacked = torch.stack([w for w in work if w is not None])
        if tuple(stacked.shape[1:]) != (size, size):
            stacked = upsample(stacked, size)
        return ModelMaps(stacked, torch.stack([p for p in proto if p is not None]), None, refs)

    def loss(
        self, module: nn.Module, batch: Batch, weights: LossWeights
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from ..ums.losses import bce_iou_terms

        if batch.targets is None:
            raise ValueError("UMS trains on targets (pseudo-labels or corrections); the batch has none")
        dev = next(module.parameters()).device
        dino, v2 = batch.feats
        target = batch.targets.to(dev)
        out = module(dino.tokens.to(dev), v2.tokens.to(dev))
        terms = bce_iou_terms(out.logits, target, out.side_logits)
        iou = _soft_iou(torch.sigmoid(out.logits.detach())[:, 0], target.float())
        return terms.total, {"loss": float(terms.total.detach()), "iou": iou}

    def targets(
        self, masks: Sequence[np.ndarray | None], feats: Sequence[BackboneFeatures], size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for i, m in enumerate(masks):
            if m is None:
                raise ValueError(f"UMS targets need a mask for every image; image {i} has none")
            rows.append(mask_to_square(m, size))
        return torch.stack(rows), torch.ones(len(rows), dtype=torch.bool)

    def train_backbones(self, config: TrainConfig) -> tuple[str, ...]:
        return (config.backbone, config.v2_backbone)

    def prepare_training(
        self,
        groups: Sequence[Group],
        backbones: Sequence[Backbone],
        cache: FeatureCache,
        config: TrainConfig,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[TrainGroup], list[str]]:
        """Encode with both backbones and make each group's CM-SPLG pseudo-labels (S, S) at the network's
        output size S = ``config.input_size``."""
        from ..features import encode_images, image_hash
        from ..imageio import read_images
        from ..pseudo_labels import pseudo_label_masks

        dino, v2 = backbones
        out, skipped = [], []
        for group in groups:
            images, _, failed = read_images(group.images)
            skipped.extend(failed)
            hashes = [image_hash(img) for img in images]
            if progress:
                progress(len(group.images))
            if len(images) < 2:
                log.warning(
                    "group %s has %d readable image(s); UMS training needs 2 or more", group.name, len(images)
                )
                continue
            feats = encode_images(dino, images, cache=cache, hashes=hashes)
            encode_images(v2, images, cache=cache, hashes=hashes)
            masks, _ = pseudo_label_masks(images, feats, size=config.input_size, crf=config.pseudo_crf)
            out.append(TrainGroup(group.name, hashes, torch.from_numpy(np.stack(masks))))
        return out, skipped

    def new_head(self, backbones: Sequence[Backbone], config: TrainConfig) -> Any:
        from ..ums.checkpoint import UMSCheckpoint
        from ..ums.net import UMSNet

        dino, v2 = backbones
        net = UMSNet.build(
            seed=config.seed, dim=dino.embed_dim, v2_dim=v2.embed_dim, width=config.decoder_width
        )
        return UMSCheckpoint(net=net, backbone=dino.spec.name, v2_backbone=v2.spec.name, bm_bar=float("nan"))

    def finish(
        self,
        head: Any,
        module: nn.Module,
        load: Loader,
        n_groups: int,
        *,
        max_group: int,
        metrics: dict[str, Any],
    ) -> tuple[Any, dict[str, Any]]:
        """B_bar measured again with the trained module (method_spec B.9)."""
        bm_bar = measure_bm_bar(module, load, n_groups, max_group)
        new = replace(
            head, net=module.eval(), bm_bar=bm_bar, metrics={**metrics, "bm_bar": bm_bar}, created=time.time()
        )
        return new, {"bm_bar": bm_bar}
