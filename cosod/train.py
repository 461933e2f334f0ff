"""Training loops on cached frozen features.

Self-supervised SCoSPARC stage 1 (method_spec A.4): one group per step, a random subset of at most 24 images,
Adam (lr 1e-4, weight decay 1e-4, betas (0.9, 0.99)), loss ``L_cooc + 0.3 * L_sal``, no labels used. The
backbone runs once per image (features go through the :class:`~cosod.features.FeatureCache`); every step
after that touches only the 1x1-conv head.

Model selection deviates from the official train.py on purpose: that code keeps the epoch with the best max-F
on the test sets. Here the checkpoint is the last epoch's, and the per-epoch training losses are recorded in
it, so no test data decides anything.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .backbones import DEFAULT_BACKBONE, Backbone, BackboneFeatures, build_backbone
from .data import Group
from .errors import ImageReadError
from .features import FeatureCache, encode_images, image_hash
from .imageio import read_image
from .scosparc import SEED, Stage1Checkpoint, Stage1Net, save_stage1, stage1_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE
    input_size: int = 224
    epochs: int = 150
    max_steps: int | None = None  # stop early after this many optimiser steps
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    max_group: int = 24
    saliency_weight: float = 0.3
    seed: int = SEED
    init: str = "seeded"  # "seeded" (official: default init under seed 123) or "identity"

    def __post_init__(self) -> None:
        if self.epochs < 1:
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
        images, hashes, skipped = [], [], []
        for path in group.images:
            try:
                img = read_image(path)
            except ImageReadError as exc:
                log.warning("skipping %s", exc)
                skipped.append(str(path))
                continue
            images.append(img)
            hashes.append(image_hash(img))
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
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    rng = np.random.default_rng(config.seed)
    history: list[float] = []
    steps = 0
    t0 = time.perf_counter()
    net.train()
    last: dict[str, float] = {}
    for _epoch in range(config.epochs):
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
    steps_total = config.max_steps or config.epochs * len(usable)
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
