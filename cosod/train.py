"""From-scratch training of a method's head on cached frozen features (``cosod train``), for every method in
:data:`cosod.methods.METHODS`.

Flow: the method's backbones encode every image once (features go through the
:class:`~cosod.features.FeatureCache`) and the method prepares its targets (``Method.prepare_training``); then
the one epoch loop of :mod:`cosod.loop` runs the method's loss (``Method.loss``) with Adam, the method's
defaults filling ``epochs``, ``weight_decay`` and ``betas``; ``Method.finish`` completes the head and the
checkpoint is written with its config, backbone ids, training data ids and metrics.

Self-supervised SCoSPARC stage 1 (method_spec A.4): one group per step, a random subset of at most 24
images, Adam (lr 1e-4, weight decay 1e-4, betas (0.9, 0.99)), loss ``L_cooc + 0.3 * L_sal``, no labels used.
Every step touches only the 1x1-conv head.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .backbones import DEFAULT_BACKBONE, Backbone, BackboneFeatures, build_backbone
from .data import Group
from .features import FeatureCache, encode_images, image_hash
from .imageio import read_images
from .loop import LoopHistory, adam, run_epochs
from .methods import Batch, HeadRecord, LossWeights, Method, get_method
from .methods.base import Loader
from .scosparc import SEED, Stage1Net

log = logging.getLogger(__name__)

# the record key of each backbone's id, in the method's backbone order
BACKBONE_ID_KEYS = ("backbone_id", "v2_backbone_id")


@dataclass(frozen=True)
class TrainConfig:
    """From-scratch training; ``epochs``, ``weight_decay`` and ``betas`` None: the method's
    :attr:`~cosod.methods.base.Method.train_defaults`."""

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
        defaults = get_method(self.model).train_defaults  # UnknownMethodError names the known models
        for key in ("epochs", "weight_decay", "betas"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, getattr(defaults, key))
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


def train_module(
    method: Method,
    module: nn.Module,
    load: Loader,
    n_groups: int,
    config: TrainConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> LoopHistory:
    """``config``'s optimisation of ``module`` (in place), ``method``'s loss on ``load(0..n_groups-1)``."""
    assert config.epochs is not None and config.weight_decay is not None and config.betas is not None
    opt = adam(module, config.lr, config.weight_decay, config.betas)
    weights = LossWeights(saliency=config.saliency_weight)
    return run_epochs(
        module,
        opt,
        load,
        n_groups,
        lambda batch: method.loss(module, batch, weights),
        seed=config.seed,
        max_group=config.max_group,
        epochs=config.epochs,
        max_steps=config.max_steps,
        on_step=on_step,
    )


def train_stage1_on_features(
    net: Stage1Net,
    groups: Sequence[BackboneFeatures] | Callable[[int], BackboneFeatures],
    n_groups: int,
    config: TrainConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """SCoSPARC's loop on features. ``groups`` is a list of per-group features or a loader ``i -> features``.
    Returns metrics: per-epoch mean losses, the last step's losses, steps and seconds."""
    get = groups if callable(groups) else groups.__getitem__
    hist = train_module(
        get_method(config.model), net, lambda i: Batch((get(i),)), n_groups, config, on_step=on_step
    )
    return hist.metrics()


def train(
    groups: Sequence[Group],
    config: TrainConfig,
    *,
    out: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    weights_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> Any:
    """Train ``config.model``'s head on folders of groups (no labels) and write its checkpoint to ``out``;
    returns the checkpoint object (a Stage1Checkpoint, a UMSCheckpoint, ...)."""
    from tqdm import tqdm

    method = get_method(config.model)
    backbones = [
        build_backbone(name, weights_dir=weights_dir, device=device, input_size=config.input_size)
        for name in method.train_backbones(config)
    ]
    cache = FeatureCache(cache_dir)
    total = sum(len(g.images) for g in groups)
    with tqdm(total=total, desc="preparing", unit="img", disable=not progress) as bar:
        usable, skipped = method.prepare_training(groups, backbones, cache, config, progress=bar.update)
    if not usable:
        raise ValueError("no group with at least 2 readable images to train on")

    def load(i: int) -> Batch:
        g = usable[i]
        feats = tuple(load_group_features(cache, b.id, g.hashes) for b in backbones)
        return Batch(feats, g.targets)

    head = method.new_head(backbones, config)
    module = method.module(head)
    assert config.epochs is not None
    steps_total = config.max_steps or config.epochs * len(usable)
    with tqdm(total=steps_total, desc="training", unit="step", disable=not progress) as bar:

        def on_step(step: int, record: dict[str, float]) -> None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items()})

        metrics = train_module(method, module, load, len(usable), config, on_step=on_step).metrics()
    metrics.update(
        n_groups=len(usable),
        n_images=sum(len(g.hashes) for g in usable),
        skipped_images=skipped,
    )
    head, extra = method.finish(head, module, load, len(usable), max_group=config.max_group, metrics=metrics)
    metrics.update(extra)
    ids = {_id_key(i): b.id for i, b in enumerate(backbones)}
    record = HeadRecord(
        config={**asdict(config), **ids},
        data_ids=sorted({h for g in usable for h in g.hashes}),
        metrics=metrics,
    )
    ckpt = method.save_head(head, Path(out), record, backbones)
    log.info("%s checkpoint written to %s (%d steps)", method.name, out, metrics["steps"])
    return ckpt


def _id_key(i: int) -> str:
    return BACKBONE_ID_KEYS[i] if i < len(BACKBONE_ID_KEYS) else f"backbone{i + 1}_id"


def _train_as(name: str, groups: Sequence[Group], config: TrainConfig, **kw: Any) -> Any:
    if config.model != name:
        raise ValueError(f"train_{name} needs a config with model={name!r}, got {config.model!r}")
    return train(groups, config, **kw)


def train_stage1(groups: Sequence[Group], config: TrainConfig, **kw: Any) -> Any:
    """:func:`train` for a ``model="scosparc"`` config (returns a Stage1Checkpoint)."""
    return _train_as("scosparc", groups, config, **kw)


def train_ums(groups: Sequence[Group], config: TrainConfig, **kw: Any) -> Any:
    """:func:`train` for a ``model="ums"`` config (returns a UMSCheckpoint)."""
    return _train_as("ums", groups, config, **kw)
