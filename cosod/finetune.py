"""Fine-tuning a model's head on corrected masks, on cached frozen features, and scoring it on held-out ones.

Data: :class:`FinetuneGroup` lists, per group, its images (HxWx3 uint8 RGB), their content hashes and, for
the corrected ones, the corrected mask (bool HxW at the original size; None for images nobody corrected).

Split: a corrected image is held out when ``heldout_score(hash) < fraction`` (a sha256 of its content hash
mapped to [0, 1)), so an image's side never changes as corrections accumulate; when no image falls under
the fraction, the one with the lowest score is held out. Held-out images never reach the loss; they still
serve as context when their group is predicted.

- **SCoSPARC stage 1** (:func:`finetune_stage1`): per step one group (at most ``max_group`` images), loss
  ``w_ss * (L_cooc + 0.3 L_sal) + w_sup * (BCE + soft IoU)``, the supervised term on the corrected images'
  maps at the token grid (h x w) against the correction box-averaged to the grid (a fraction in [0, 1]).
- **UMS** (:func:`finetune_ums`): targets are the corrections for corrected images and the active model's
  predicted masks (pseudo-labels) for the others; BCE + IoU on the final and side outputs
  (:func:`cosod.train.train_ums_on_features`); B_bar is measured again on the training groups afterwards.

Evaluation (:func:`evaluate_heldout`): each group is predicted whole through the real pipeline (threshold,
region refinement, CRF) and the final binary masks of the held-out images are scored against their
corrections with :class:`~cosod.metrics.CoSODEvaluator` (IoU, max F, MAE, HCE, ...).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import BackboneFeatures
from .metrics import CoSODEvaluator
from .pipeline import Pipeline, PipelineConfig
from .scosparc import Stage1Net, stage1_loss

log = logging.getLogger(__name__)

HIGHER_IS_BETTER = {
    "iou": True,
    "max_f": True,
    "mean_f": True,
    "max_e": True,
    "mean_e": True,
    "s_measure": True,
    "mae": False,
    "hce": False,
}


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300
    lr: float = 1e-3
    supervised_weight: float = 1.0
    self_supervised_weight: float = 1.0
    max_group: int = 24
    seed: int = 123
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction!r}")
        if self.max_group < 2:
            raise ValueError(f"max_group must be >= 2, got {self.max_group!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class FinetuneGroup:
    """A group: ``images`` HxWx3 uint8 RGB, ``hashes`` their :func:`~cosod.features.image_hash`, ``masks``
    bool HxW corrections at each image's size (None where nobody corrected the image)."""

    name: str
    images: list[np.ndarray]
    hashes: list[str]
    masks: list[np.ndarray | None]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.hashes) == len(self.masks):
            raise ValueError(
                f"group {self.name!r}: {len(self.images)} images, {len(self.hashes)} hashes, "
                f"{len(self.masks)} masks; they must match"
            )
        for img, m in zip(self.images, self.masks, strict=True):
            if m is not None and (m.dtype != bool or m.shape != img.shape[:2]):
                raise ValueError(
                    f"group {self.name!r}: a mask must be bool at its image's size {img.shape[:2]}, "
                    f"got {m.dtype} {m.shape}"
                )


@dataclass
class FinetuneResult:
    """A trained candidate head (a Stage1Net or a UMSCheckpoint), the training record and the split."""

    head: Any
    train_metrics: dict[str, Any]
    train_hashes: list[str]
    heldout_hashes: list[str]
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def heldout_score(digest: str) -> float:
    """A deterministic number in [0, 1) from an image's content hash."""
    return int(hashlib.sha256(f"heldout:{digest}".encode()).hexdigest()[:15], 16) / float(16**15)


def split_heldout(hashes: Sequence[str], fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(train, held-out) of the distinct ``hashes`` (see the module doc); under 2 images: none held out."""
    uniq = sorted(set(hashes))
    if len(uniq) < 2:
        return uniq, []
    held = [h for h in uniq if heldout_score(h) < fraction]
    if not held:
        held = [min(uniq, key=heldout_score)]
    if len(held) == len(uniq):
        held.remove(max(held, key=heldout_score))
    hs = set(held)
    return [h for h in uniq if h not in hs], held


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """bool HxW -> float32 (h, w): the foreground fraction of each grid cell (box average over the image
    squashed to the grid, as the backbone squashes the image to its input size)."""
    img = Image.fromarray(mask.astype(np.float32))
    return torch.from_numpy(np.array(img.resize((grid[1], grid[0]), Image.Resampling.BOX), dtype=np.float32))


def mask_to_square(mask: np.ndarray, size: int) -> torch.Tensor:
    """bool HxW -> float32 (size, size) 0/1 (nearest), the UMS network's output size."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
    return torch.from_numpy((np.asarray(img) >= 128).astype(np.float32))


def supervised_terms(maps: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and soft IoU (mean over images of ``1 - sum(PY) / (sum P + sum Y - sum PY)``) of maps (B, h, w)
    in (0, 1) against targets (B, h, w) in [0, 1]."""
    p = maps.float().clamp(1e-6, 1 - 1e-6)
    y = target.float()
    bce = F.binary_cross_entropy(p, y)
    inter = (p * y).flatten(1).sum(1)
    union = p.flatten(1).sum(1) + y.flatten(1).sum(1) - inter
    return bce, (1.0 - inter / (union + 1e-5)).mean()


def _train_part(group: FinetuneGroup, held: set[str]) -> list[int]:
    return [i for i, h in enumerate(group.hashes) if h not in held]


def finetune_stage1(
    net: Stage1Net,
    feats: Sequence[BackboneFeatures],
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    config: FinetuneConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``net`` in place. ``feats[g]``: group g's training images; ``targets[g]``: ((B, h, w) grid
    targets, (B,) bool "has a correction"). Groups of fewer than 2 images are skipped."""
    usable = [g for g in range(len(feats)) if len(feats[g]) >= 2]
    if not usable:
        raise ValueError("fine-tuning stage 1 needs a group with at least 2 training images")
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=1e-4)
    rng = np.random.default_rng(config.seed)
    order: list[int] = []
    history: list[dict[str, float]] = []
    net.train()
    dev = next(net.parameters()).device
    for step in range(1, config.steps + 1):
        if not order:
            order = [usable[i] for i in rng.permutation(len(usable))]
        g = order.pop()
        n = len(feats[g])
        pick = np.sort(rng.choice(n, size=min(n, config.max_group), replace=False)).tolist()
        sub = feats[g].select(pick)
        tokens = sub.tokens.to(dev)
        maps = net(tokens)
        ss = stage1_loss(tokens, sub.cls_attention.to(dev), maps).total
        target, labelled = targets[g][0][pick].to(dev), targets[g][1][pick].to(dev)
        if bool(labelled.any()):
            bce, iou = supervised_terms(maps[labelled], target[labelled])
        else:
            bce = iou = maps.sum() * 0.0
        loss = config.self_supervised_weight * ss + config.supervised_weight * (bce + iou)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec = {
            "loss": float(loss.detach()),
            "self_supervised": float(ss.detach()),
            "bce": float(bce.detach()),
            "iou_loss": float(iou.detach()),
        }
        history.append(rec)
        if on_step:
            on_step(step, rec)
    net.eval()
    tail = history[-min(len(history), 20) :]
    return {"steps": config.steps, "last": {k: float(np.mean([r[k] for r in tail])) for k in tail[0]}}


def finetune_ums(
    ums: Any,
    load: Callable[[int], tuple[BackboneFeatures, BackboneFeatures, torch.Tensor]],
    n_groups: int,
    config: FinetuneConfig,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Fine-tune a copy of ``ums`` (a UMSCheckpoint); ``load(g)`` gives group g's DINO and DINOv2 features
    and its (B, S, S) float targets in [0, 1]. Returns the new checkpoint (B_bar re-measured) and metrics."""
    from .train import TrainConfig, measure_bm_bar, train_ums_on_features

    net = copy.deepcopy(ums.net)
    tc = TrainConfig(
        model="ums",
        epochs=10**6,
        max_steps=config.steps,
        lr=config.lr,
        max_group=config.max_group,
        seed=config.seed,
    )
    metrics = train_ums_on_features(net, load, n_groups, tc, on_step=on_step)
    bm_bar = measure_bm_bar(net, load, n_groups, config.max_group)
    cand = replace(
        ums, net=net.eval(), bm_bar=bm_bar, metrics={**metrics, "bm_bar": bm_bar}, created=time.time()
    )
    return cand, {**metrics, "bm_bar": bm_bar}


def head_pipeline(base: Pipeline, head: Any, config: PipelineConfig | None = None) -> Pipeline:
    """A :class:`Pipeline` with ``head`` (Stage1Net or UMSCheckpoint) on ``base``'s backbone(s) and cache;
    ``config`` defaults to ``base.config`` (it must name the same model)."""
    cfg = config or base.config
    if cfg.model != base.config.model:
        raise ValueError(f"config model {cfg.model!r} differs from the base pipeline's {base.config.model!r}")
    if cfg.model == "ums":
        return Pipeline(cfg, base.backbone, None, base.cache, ums=head, v2_backbone=base.v2_backbone)
    return Pipeline(cfg, base.backbone, head, base.cache)


def evaluate_heldout(
    pipeline: Pipeline, groups: Sequence[FinetuneGroup], heldout: set[str]
) -> dict[str, Any]:
    """Predict each group containing held-out images; score those images' final masks against their
    corrections. Returns ``{"n_images", **overall measures}``; ``n_images`` 0 (and no measures) when none."""
    ev = CoSODEvaluator()
    for group in groups:
        idx = [i for i, h in enumerate(group.hashes) if h in heldout and group.masks[i] is not None]
        if not idx:
            continue
        pred = pipeline.predict_group(group.images, hashes=group.hashes)
        for i in idx:
            gt = group.masks[i]
            assert gt is not None
            ev.step(np.asarray(pred.masks[i], dtype=bool), gt, group=group.name, name=group.hashes[i])
    if ev.n_images == 0:
        return {"n_images": 0}
    return {"n_images": ev.n_images, **ev.results()["overall"]}


def finetune(
    active: Pipeline,
    groups: Sequence[FinetuneGroup],
    config: FinetuneConfig = FinetuneConfig(),
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Split the corrected images, then train a copy of ``active``'s head on the training part (see the
    module doc). ``active`` is not modified. Raises ValueError when nothing is left to train on."""
    t0 = time.perf_counter()
    corrected = [h for g in groups for h, m in zip(g.hashes, g.masks, strict=True) if m is not None]
    train_h, held_h = split_heldout(corrected, config.heldout_fraction)
    held = set(held_h)
    parts = [(g, _train_part(g, held)) for g in groups]
    parts = [(g, idx) for g, idx in parts if len(idx) >= 2]
    if not parts:
        raise ValueError("no group has 2 or more training images after holding out the validation images")
    if active.config.model == "ums":
        head, metrics = _finetune_ums(active, parts, config, on_step)
    else:
        assert active.stage1 is not None
        net = copy.deepcopy(active.stage1)
        feats, targets = [], []
        for g, idx in parts:
            f = active.encode([g.images[i] for i in idx], [g.hashes[i] for i in idx])
            grid = f.grid
            tgt = torch.zeros(len(idx), *grid)
            has = torch.zeros(len(idx), dtype=torch.bool)
            for row, i in enumerate(idx):
                m = g.masks[i]
                if m is not None:
                    tgt[row], has[row] = mask_to_grid(m, grid), True
            feats.append(f)
            targets.append((tgt, has))
        metrics = finetune_stage1(net, feats, targets, config, on_step=on_step)
        head = net.cpu().eval()
    seconds = time.perf_counter() - t0
    log.info("fine-tuned %s head on %d groups in %.1f s", active.config.model, len(parts), seconds)
    return FinetuneResult(head, {**metrics, "seconds": seconds}, train_h, held_h, seconds)


def _finetune_ums(
    active: Pipeline,
    parts: list[tuple[FinetuneGroup, list[int]]],
    config: FinetuneConfig,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> tuple[Any, dict[str, Any]]:
    assert active.v2_backbone is not None
    size = active.config.input_size
    loaded = []
    for g, idx in parts:
        needs_pseudo = any(g.masks[i] is None for i in idx)
        pseudo = active.predict_group(g.images, hashes=g.hashes).masks if needs_pseudo else None
        imgs, hs = [g.images[i] for i in idx], [g.hashes[i] for i in idx]
        dino = active.encode(imgs, hs)
        v2 = active.encode(imgs, hs, v2=True)
        rows = []
        for i in idx:
            m = g.masks[i]
            if m is None:
                assert pseudo is not None
                m = np.asarray(pseudo[i], dtype=bool)
            rows.append(mask_to_square(m, size))
        loaded.append((dino, v2, torch.stack(rows)))
    return finetune_ums(active.ums, loaded.__getitem__, len(loaded), config, on_step=on_step)


def is_better(candidate: dict[str, Any], active: dict[str, Any], metric: str, margin: float) -> bool:
    """The promotion rule: the candidate beats the active model by more than ``margin`` on ``metric``
    (higher is better except for ``mae`` and ``hce``)."""
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown promotion metric {metric!r}; known: {', '.join(HIGHER_IS_BETTER)}")
    if metric not in candidate or metric not in active:
        return False
    gain = candidate[metric] - active[metric]
    return (gain if HIGHER_IS_BETTER[metric] else -gain) > margin
