"""Training loops on cached frozen features: SCoSPARC stage 1 and UMS-CoSOD.

Self-supervised SCoSPARC stage 1 (method_spec A.4): one group per step, a random subset of at most 24 images,
Adam (lr 1e-4, weight decay 1e-4, betas (0.9, 0.99)), loss ``L_cooc + 0.3 * L_sal``, no labels used. The
backbone runs once per image (features go through the :class:`~cosod.features.FeatureCache`); every step
after that touches only the 1x1-conv head.

Model selection deviates from the official train.py on purpose: that code keeps the epoch with the best max-F
on the test sets. Here the checkpoint is the last epoch's, and the per-epoch training losses are recorded in
it, so no test data decides anything.

UMS-CoSOD (method_spec B.8): pseudo-labels from CM-SPLG (:mod:`cosod.pseudo_labels`) computed once per group,
then one group (at most 24 images) per step, Adam (lr 1e-4, betas (0.9, 0.999), no weight decay), BCE + IoU
on the final and side outputs. After training, the mean uncertainty B_bar of the per-map adaptive threshold is
measured on the training images and stored in the checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import DEFAULT_BACKBONE, Backbone, BackboneFeatures, build_backbone
from .data import Group
from .features import FeatureCache, encode_images, image_hash
from .imageio import read_images
from .scosparc import SEED, Stage1Checkpoint, Stage1Net, save_stage1, stage1_loss

log = logging.getLogger(__name__)


MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "scosparc": {"epochs": 150, "weight_decay": 1e-4, "betas": (0.9, 0.99)},
    "ums": {"epochs": 100, "weight_decay": 0.0, "betas": (0.9, 0.999)},
}


@dataclass(frozen=True)
class TrainConfig:
    model: str = "scosparc"
    backbone: str = DEFAULT_BACKBONE
    v2_backbone: str = "vit_base_patch14_reg4_dinov2.lvd142m"  # UMS only
    input_size: int = 224
    epochs: int | None = None  # None: the model's default (150 SCoSPARC, 100 UMS)
    max_steps: int | None = None  # stop early after this many optimiser steps
    lr: float = 1e-4
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    max_group: int = 24
    saliency_weight: float = 0.3
    seed: int = SEED
    init: str = "seeded"  # "seeded" (official: default init under seed 123) or "identity"
    pseudo_crf: bool = True  # UMS: snap pseudo-labels to image edges
    decoder_width: int = 64  # UMS decoder channels (method_spec B.6); smaller only for CPU tests

    def __post_init__(self) -> None:
        if self.model not in MODEL_DEFAULTS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODEL_DEFAULTS)}")
        for key, value in MODEL_DEFAULTS[self.model].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.epochs is None or self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_group < 2:
            raise ValueError(f"max_group must be at least 2, got {self.max_group}")
        if self.init not in ("seeded", "identity"):
            raise ValueError(f"init must be 'seeded' or 'identity', got {self.init!r}")


@dataclass
class EncodedGroup:
    """A training group after encoding: its name and the content hashes of its readable images."""

    name: str
    hashes: list[str]
    skipped: list[str] = field(default_factory=list)


def encode_groups(
    groups: Sequence[Group],
    backbone: Backbone,
    cache: FeatureCache,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[EncodedGroup]:
    """Read and encode every image once (into ``cache``). Unreadable images are logged and skipped."""
    out = []
    for group in groups:
        images, _, skipped = read_images(group.images)
        hashes = [image_hash(img) for img in images]
        if images:
            encode_images(backbone, images, cache=cache, hashes=hashes)
        out.append(EncodedGroup(group.name, hashes, skipped))
        if progress:
            progress(len(group.images))
    return out


def load_group_features(cache: FeatureCache, backbone_id: str, hashes: Sequence[str]) -> BackboneFeatures:
    parts = []
    for h in hashes:
        f = cache.get(h, backbone_id)
        if f is None:
            raise RuntimeError(f"features of image {h[:12]} vanished from the cache at {cache.root}")
        parts.append(f)
    return BackboneFeatures.concat(parts)


def _epochs(config: TrainConfig) -> int:
    assert config.epochs is not None  # filled in by TrainConfig.__post_init__
    return config.epochs


def _adam(params: Any, config: TrainConfig) -> torch.optim.Adam:
    assert config.weight_decay is not None and config.betas is not None
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)


def train_stage1_on_features(
    net: Stage1Net,
    groups: Sequence[BackboneFeatures] | Callable[[int], BackboneFeatures],
    n_groups: int,
    config: TrainConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, object]:
    """The optimisation loop. ``groups`` is a list of per-group features or a loader ``i -> features``.
    Returns metrics: per-epoch mean losses, the last loss, steps and seconds."""
    load = groups if callable(groups) else groups.__getitem__
    params = [p for p in net.parameters() if p.requires_grad]
    opt = _adam(params, config)
    rng = np.random.default_rng(config.seed)
    history: list[float] = []
    steps = 0
    t0 = time.perf_counter()
    net.train()
    last: dict[str, float] = {}
    for _epoch in range(_epochs(config)):
        losses = []
        for gi in rng.permutation(n_groups):
            feats = load(int(gi))
            n = len(feats)
            if n < 2:
                continue
            pick = np.sort(rng.choice(n, size=min(n, config.max_group), replace=False))
            sub = feats.select(pick.tolist())
            maps = net(sub.tokens)
            loss = stage1_loss(sub.tokens, sub.cls_attention, maps, config.saliency_weight)
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            opt.step()
            steps += 1
            last = loss.as_dict()
            losses.append(last["loss"])
            if on_step:
                on_step(steps, last)
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if losses:
            history.append(float(np.mean(losses)))
        if config.max_steps is not None and steps >= config.max_steps:
            break
    net.eval()
    return {
        "epoch_loss": history,
        "last": last,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
    }


def train_stage1(
    groups: Sequence[Group],
    config: TrainConfig,
    *,
    out: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    weights_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> Stage1Checkpoint:
    """Self-supervised stage-1 training on folders of groups (no labels); writes the checkpoint to ``out``."""
    from tqdm import tqdm

    backbone = build_backbone(
        config.backbone, weights_dir=weights_dir, device=device, input_size=config.input_size
    )
    cache = FeatureCache(cache_dir)
    total = sum(len(g.images) for g in groups)
    with tqdm(total=total, desc="encoding", unit="img", disable=not progress) as bar:
        encoded = encode_groups(groups, backbone, cache, progress=bar.update)
    usable = [g for g in encoded if len(g.hashes) >= 2]
    for g in encoded:
        if len(g.hashes) < 2:
            log.warning(
                "group %s has %d readable image(s); training needs 2 or more, skipped", g.name, len(g.hashes)
            )
    if not usable:
        raise ValueError("no group with at least 2 readable images to train on")
    net = (Stage1Net.identity if config.init == "identity" else Stage1Net.seeded)(backbone.embed_dim)
    net.to(backbone.device)
    steps_total = config.max_steps or _epochs(config) * len(usable)
    with tqdm(total=steps_total, desc="training", unit="step", disable=not progress) as bar:

        def on_step(step: int, loss: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss['loss']:.4f}")

        metrics = train_stage1_on_features(
            net,
            lambda i: load_group_features(cache, backbone.id, usable[i].hashes),
            len(usable),
            config,
            on_step=on_step,
        )
    metrics.update(
        n_groups=len(usable),
        n_images=sum(len(g.hashes) for g in usable),
        skipped_images=[p for g in encoded for p in g.skipped],
    )
    ckpt = Stage1Checkpoint(
        net=net.cpu(),
        backbone=backbone.spec.name,
        config={**asdict(config), "backbone_id": backbone.id},
        data_ids=sorted({h for g in usable for h in g.hashes}),
        metrics=metrics,
    )
    save_stage1(ckpt, Path(out))
    log.info("stage-1 checkpoint written to %s (%d steps)", out, metrics["steps"])
    return ckpt


@dataclass
class UMSGroup:
    """A UMS training group: content hashes of its readable images and their pseudo-labels (B, S, S)."""

    name: str
    hashes: list[str]
    targets: torch.Tensor


def prepare_ums_groups(
    groups: Sequence[Group],
    backbones: tuple[Backbone, Backbone],
    cache: FeatureCache,
    config: TrainConfig,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[UMSGroup], list[str]]:
    """Read every group once: encode with both backbones (into the cache) and make its pseudo-labels at the
    network's output size. Returns the usable groups (2 or more readable images) and the skipped paths."""
    from .pseudo_labels import pseudo_label_masks

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
        out.append(UMSGroup(group.name, hashes, torch.from_numpy(np.stack(masks))))
    return out, skipped


def _soft_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    p = pred >= 0.5
    t = target >= 0.5
    union = (p | t).flatten(1).sum(dim=1).clamp_min(1)
    return float(((p & t).flatten(1).sum(dim=1) / union).mean())


def train_ums_on_features(
    net: Any,
    load: Callable[[int], tuple[BackboneFeatures, BackboneFeatures, torch.Tensor]],
    n_groups: int,
    config: TrainConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """The UMS optimisation loop. ``load(i)`` gives group i's DINO features, DINOv2 features and targets
    (B, S, S). Returns per-epoch mean loss and IoU against the pseudo-labels, steps and seconds."""
    from .ums.losses import bce_iou_terms

    opt = _adam(net.parameters(), config)
    rng = np.random.default_rng(config.seed)
    epoch_loss: list[float] = []
    epoch_iou: list[float] = []
    steps = 0
    t0 = time.perf_counter()
    net.train()
    for _epoch in range(_epochs(config)):
        losses, ious = [], []
        for gi in rng.permutation(n_groups):
            dino, v2, target = load(int(gi))
            pick = np.sort(
                rng.choice(len(dino), size=min(len(dino), config.max_group), replace=False)
            ).tolist()
            out = net(dino.tokens[pick], v2.tokens[pick])
            terms = bce_iou_terms(out.logits, target[pick], out.side_logits)
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            opt.step()
            steps += 1
            losses.append(float(terms.total.detach()))
            ious.append(_soft_iou(torch.sigmoid(out.logits.detach())[:, 0], target[pick].float()))
            if on_step:
                on_step(steps, {"loss": losses[-1], "iou": ious[-1]})
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if losses:
            epoch_loss.append(float(np.mean(losses)))
            epoch_iou.append(float(np.mean(ious)))
        if config.max_steps is not None and steps >= config.max_steps:
            break
    net.eval()
    return {
        "epoch_loss": epoch_loss,
        "epoch_iou": epoch_iou,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def measure_bm_bar(
    net: Any,
    load: Callable[[int], tuple[BackboneFeatures, BackboneFeatures, torch.Tensor]],
    n_groups: int,
    max_group: int = 24,
) -> float:
    """Mean of ``1 - conf`` over the training images, with RRBE's per-map confidence (method_spec B.9)."""
    from .refine import map_confidences

    values = []
    net.eval()
    for gi in range(n_groups):
        dino, v2, _ = load(gi)
        for start in range(0, len(dino), max_group):
            idx = list(range(start, min(start + max_group, len(dino))))
            maps = torch.sigmoid(net(dino.tokens[idx], v2.tokens[idx]).logits[:, 0])
            values.extend((1.0 - map_confidences(maps)).tolist())
    return float(np.mean(values))


def train_ums(
    groups: Sequence[Group],
    config: TrainConfig,
    *,
    out: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    weights_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> Any:
    """Train UMS-CoSOD on CM-SPLG pseudo-labels of folders of groups (no labels); writes the checkpoint."""
    from tqdm import tqdm

    from .ums.checkpoint import UMSCheckpoint, save_ums
    from .ums.net import UMSNet

    if config.model != "ums":
        raise ValueError(f"train_ums needs a config with model='ums', got {config.model!r}")
    dino = build_backbone(
        config.backbone, weights_dir=weights_dir, device=device, input_size=config.input_size
    )
    v2 = build_backbone(
        config.v2_backbone, weights_dir=weights_dir, device=device, input_size=config.input_size
    )
    cache = FeatureCache(cache_dir)
    total = sum(len(g.images) for g in groups)
    with tqdm(total=total, desc="pseudo-labels", unit="img", disable=not progress) as bar:
        usable, skipped = prepare_ums_groups(groups, (dino, v2), cache, config, progress=bar.update)
    if not usable:
        raise ValueError("no group with at least 2 readable images to train on")

    def load(i: int) -> tuple[BackboneFeatures, BackboneFeatures, torch.Tensor]:
        g = usable[i]
        return (
            load_group_features(cache, dino.id, g.hashes),
            load_group_features(cache, v2.id, g.hashes),
            g.targets,
        )

    net = UMSNet.build(seed=config.seed, dim=dino.embed_dim, v2_dim=v2.embed_dim, width=config.decoder_width)
    steps_total = config.max_steps or _epochs(config) * len(usable)
    with tqdm(total=steps_total, desc="training", unit="step", disable=not progress) as bar:

        def on_step(step: int, loss: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss['loss']:.4f}", iou=f"{loss['iou']:.3f}")

        metrics = train_ums_on_features(net, load, len(usable), config, on_step=on_step)
    bm_bar = measure_bm_bar(net, load, len(usable), config.max_group)
    metrics.update(
        n_groups=len(usable),
        n_images=sum(len(g.hashes) for g in usable),
        skipped_images=skipped,
        bm_bar=bm_bar,
    )
    ckpt = UMSCheckpoint(
        net=net,
        backbone=dino.spec.name,
        v2_backbone=v2.spec.name,
        bm_bar=bm_bar,
        config={**asdict(config), "backbone_id": dino.id, "v2_backbone_id": v2.id},
        data_ids=sorted({h for g in usable for h in g.hashes}),
        metrics=metrics,
    )
    save_ums(ckpt, Path(out))
    log.info("UMS checkpoint written to %s (%d steps, B_bar %.4f)", out, metrics["steps"], bm_bar)
    return ckpt
