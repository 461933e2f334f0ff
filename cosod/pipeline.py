"""The co-salient pipeline: a group of images in, one mask per image out.

    backbone (frozen, cached) -> stage 1 (cross-image attention) -> adaptive threshold
        -> stage 2 (region-level refinement) -> dense CRF -> masks at each image's original size

Behaviour at the edges, all tested:

- **Empty group**: an empty :class:`GroupPrediction` (``mode == "empty"``); no model runs.
- **One image**: there is nothing to co-attend to, so the map is the image's own saliency, the head-mean DINO
  CLS attention passed through the same ``sigmoid((a - 0.65) / 0.15)`` as stage 1 (``mode == "single"``);
  thresholding, refinement and CRF then run as usual.
- **Large groups**: every image is compared with at most ``max_refs`` (K, default 24) reference images: the
  K images whose content hashes sort first. The choice depends on image content only (not on order), and the
  cost of stage 1 grows linearly with the group size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .backbones import DEFAULT_BACKBONE, Backbone, BackboneFeatures, build_backbone
from .features import FeatureCache, encode_images, image_hash
from .refine import (
    ALPHA_C,
    BM_BAR,
    BOX_SIM,
    TH0,
    CRFParams,
    RegionDecision,
    crf_refine,
    group_prototype,
    group_threshold,
    map_thresholds,
    refine_regions,
    resize_mask,
    resize_soft,
    upsample,
)
from .scosparc import Stage1Net, load_stage1

log = logging.getLogger(__name__)

MODELS = ("scosparc",)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides a prediction. Part of :attr:`Pipeline.version_id`."""

    model: str = "scosparc"
    backbone: str = DEFAULT_BACKBONE
    input_size: int = 224
    max_refs: int = 24
    stage1_checkpoint: str | None = None
    stage1_init: str = "identity"  # without a checkpoint: "identity" (training-free) or "seeded" (random)
    threshold: str = "group"  # "group" (SCoSPARC code) or "map" (UMS paper, per map)
    th0: float = TH0
    alpha_c: float = ALPHA_C
    bm_bar: float = BM_BAR
    refine: bool = True
    box_sim: float = BOX_SIM
    crf: bool = True
    crf_params: CRFParams = field(default_factory=CRFParams)
    batch_size: int = 8  # backbone batch; does not change results

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}")
        if self.threshold not in ("group", "map"):
            raise ValueError(f"threshold must be 'group' or 'map', got {self.threshold!r}")
        if self.stage1_init not in ("identity", "seeded"):
            raise ValueError(f"stage1_init must be 'identity' or 'seeded', got {self.stage1_init!r}")
        if self.max_refs < 2:
            raise ValueError(f"max_refs must be at least 2, got {self.max_refs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class GroupPrediction:
    """Per image, in input order: ``soft`` float32 HxW in [0, 1] (stage-1 map at the original size),
    ``masks`` bool HxW at the original size, ``scores`` in [0, 1] (mean soft value inside the mask, 0 when the
    mask is empty). ``timings`` holds seconds per stage for the whole group."""

    soft: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    mode: str = "empty"
    thresholds: list[float] = field(default_factory=list)
    references: list[int] = field(default_factory=list)
    regions: list[RegionDecision | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.masks)


def choose_references(hashes: Sequence[str], k: int) -> list[int]:
    """Indices of the reference images of a group: all of them when there are at most ``k``, else the ``k``
    whose content hashes sort first (deterministic, order-independent, stable as a group grows)."""
    n = len(hashes)
    if n <= k:
        return list(range(n))
    return sorted(sorted(range(n), key=lambda i: hashes[i])[:k])


def reference_mask(n: int, refs: Sequence[int]) -> torch.Tensor:
    """(n, n) bool: row i marks the reference images image i is compared with (never itself)."""
    m = torch.zeros(n, n, dtype=torch.bool)
    m[:, list(refs)] = True
    m.fill_diagonal_(False)
    return m


def _check_images(images: Sequence[np.ndarray]) -> None:
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"image {i}: expected an HxWx3 uint8 RGB array, got {desc}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i}: empty image of shape {img.shape}")


class Pipeline:
    """Encode a group once, then threshold, refine and CRF it. Build with :meth:`build`."""

    def __init__(
        self,
        config: PipelineConfig,
        backbone: Backbone,
        stage1: Stage1Net,
        cache: FeatureCache | None = None,
    ):
        if stage1.dim != backbone.embed_dim:
            raise ValueError(
                f"stage-1 model has dim {stage1.dim} but backbone {backbone.spec.name} "
                f"gives {backbone.embed_dim}"
            )
        self.config = config
        self.backbone = backbone
        self.stage1 = stage1.eval().to(backbone.device)
        self.cache = cache
        self._version_id = self._compute_version_id()

    @classmethod
    def build(
        cls,
        config: PipelineConfig | None = None,
        *,
        weights_dir: str | None = None,
        cache_dir: str | None = None,
        device: str = "cpu",
    ) -> Pipeline:
        """Load the backbone (raises :class:`~cosod.errors.WeightsMissingError` without its file) and the
        stage-1 model (the checkpoint, else the ``stage1_init`` variant)."""
        cfg = config or PipelineConfig()
        backbone = build_backbone(
            cfg.backbone, weights_dir=weights_dir, device=device, input_size=cfg.input_size
        )
        if cfg.stage1_checkpoint:
            stage1 = load_stage1(cfg.stage1_checkpoint).net
        elif cfg.stage1_init == "identity":
            stage1 = Stage1Net.identity(backbone.embed_dim)
        else:
            stage1 = Stage1Net.seeded(backbone.embed_dim)
        cache = FeatureCache(cache_dir) if cache_dir else None
        return cls(cfg, backbone, stage1, cache)

    def _compute_version_id(self) -> str:
        cfg = asdict(self.config)
        cfg.pop("batch_size")
        cfg.pop("stage1_checkpoint")  # the weights themselves are hashed below
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        h.update(self.backbone.id.encode())
        for name, tensor in sorted(self.stage1.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def version_id(self) -> str:
        """Stable id of config + backbone weights + stage-1 weights; changes when any of them changes."""
        return self._version_id

    def encode(self, images: Sequence[np.ndarray], hashes: Sequence[str] | None = None) -> BackboneFeatures:
        return encode_images(
            self.backbone, images, cache=self.cache, hashes=hashes, batch_size=self.config.batch_size
        )

    @torch.no_grad()
    def stage1_maps(self, feats: BackboneFeatures, hashes: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """(B, h, w) soft maps and the reference indices used. One image: its saliency (module docstring)."""
        n = len(feats)
        if n == 1:
            net = self.stage1
            return torch.sigmoid((feats.cls_attention - net.thresh) / net.temperature), [0]
        refs = choose_references(hashes, self.config.max_refs)
        maps = self.stage1(feats.tokens.to(self.backbone.device), reference_mask(n, refs), chunk=16)
        return maps.float().cpu(), refs

    def predict_group(
        self, images: Sequence[np.ndarray], *, hashes: Sequence[str] | None = None
    ) -> GroupPrediction:
        """Masks for a group. images: list of HxWx3 uint8 RGB arrays, any sizes; hashes: their
        :func:`~cosod.features.image_hash` values if already known."""
        _check_images(images)
        if not images:
            return GroupPrediction(mode="empty")
        t0 = time.perf_counter()
        digests = list(hashes) if hashes is not None else [image_hash(im) for im in images]
        feats = self.encode(images, digests)
        t1 = time.perf_counter()
        maps, refs = self.stage1_maps(feats, digests)
        t2 = time.perf_counter()
        pred = self.masks_from_maps(images, feats, maps)
        pred.references = refs
        pred.mode = "single" if len(images) == 1 else "group"
        pred.timings = {"backbone": t1 - t0, "stage1": t2 - t1, **pred.timings}
        pred.timings["total"] = time.perf_counter() - t0
        return pred

    def masks_from_maps(
        self, images: Sequence[np.ndarray], feats: BackboneFeatures, maps: torch.Tensor
    ) -> GroupPrediction:
        """Threshold, refine and CRF given stage-1 maps (B, h, w) in [0, 1]; ``feats`` supplies the tokens
        for the region prototype. Used by :meth:`predict_group` and by model evaluation in training."""
        cfg = self.config
        t0 = time.perf_counter()
        grid = feats.grid
        size = cfg.input_size
        work = upsample(maps, size)  # (B, S, S)
        if cfg.threshold == "group":
            th = torch.full(
                (len(images),),
                group_threshold(work, grid, th0=cfg.th0, alpha_c=cfg.alpha_c, bm_bar=cfg.bm_bar),
            )
        else:
            th = map_thresholds(work, th0=cfg.th0, alpha_c=cfg.alpha_c, bm_bar=cfg.bm_bar)
        binary_work = (work >= th[:, None, None]).numpy()
        regions: list[RegionDecision | None] = [None] * len(images)
        if cfg.refine:
            proto = group_prototype(feats.tokens, maps >= th[:, None, None])
            for i in range(len(images)):
                binary_work[i], regions[i] = refine_regions(
                    binary_work[i], feats.tokens[i], proto, box_sim=cfg.box_sim
                )
        t1 = time.perf_counter()
        masks: list[np.ndarray] = []
        for i, img in enumerate(images):
            hw = img.shape[:2]
            if cfg.crf:
                masks.append(crf_refine(img, binary_work[i], cfg.crf_params))
            else:
                masks.append(resize_mask(binary_work[i], hw))
        t2 = time.perf_counter()
        soft = [resize_soft(work[i].numpy(), img.shape[:2]) for i, img in enumerate(images)]
        scores = [float(s[m].mean()) if m.any() else 0.0 for s, m in zip(soft, masks, strict=True)]
        return GroupPrediction(
            soft=soft,
            masks=masks,
            scores=scores,
            timings={"refine": t1 - t0, "crf": t2 - t1, "resize": time.perf_counter() - t2},
            thresholds=[float(t) for t in th],
            regions=regions,
        )


def describe(config: PipelineConfig) -> dict[str, Any]:
    """JSON-friendly view of a config (for checkpoints, /health and reports)."""
    return asdict(config)
