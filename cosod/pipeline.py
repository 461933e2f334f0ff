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

from .absence import ABSENCE_Z, AbsenceDecision, decide_from_regions
from .backbones import DEFAULT_BACKBONE, Backbone, BackboneFeatures, build_backbone
from .densecrf import default_workers, prestart
from .features import FeatureCache, check_precision, encode_images, image_hash
from .methods import METHODS, Method, get_method
from .methods.base import ModelMaps as ModelMaps
from .methods.base import choose_references as choose_references
from .methods.base import reference_mask as reference_mask
from .methods.scosparc import stage1_maps
from .refine import (
    ALPHA_C,
    BOX_SIM,
    CRF_ASPECTS,
    CRF_UNIFORMS,
    REFINE_FALLBACKS,
    TH0,
    CRFParams,
    RegionDecision,
    component_grid_masks,
    crf_refine_group,
    group_prototype,
    group_threshold,
    map_thresholds,
    output_map,
    refine_regions,
    resize_soft,
)

log = logging.getLogger(__name__)

MODELS = tuple(METHODS)  # the built-in methods; cosod.methods.METHODS is the live registry


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides a prediction. Part of :attr:`Pipeline.version_id`."""

    model: str = "scosparc"
    backbone: str = DEFAULT_BACKBONE
    input_size: int = 224
    max_refs: int = 24
    stage1_checkpoint: str | None = None
    stage1_init: str = "identity"  # without a checkpoint: "identity" (training-free) or "seeded" (random)
    ums_checkpoint: str | None = None  # model="ums" needs one; it names its two backbones
    threshold: str = "auto"  # "group" (SCoSPARC code), "map" (UMS paper), "auto": the model's own
    th0: float = TH0
    alpha_c: float = ALPHA_C
    bm_bar: float | None = None  # None: the model's own (0.48 SCoSPARC; measured per UMS checkpoint)
    refine: bool = True
    box_sim: float = BOX_SIM
    crf: bool = True
    crf_params: CRFParams = field(default_factory=CRFParams)
    batch_size: int = 8  # backbone batch; does not change results
    # Deliberate differences from the official code: each off by default (README, "Faithful by default").
    feature_precision: str = "float32"  # "float16": features (and cache) rounded; half the cache's disk
    backbone_amp: bool = False  # True: the backbone runs under bf16 autocast on CUDA (faster, not bit-exact)
    refine_fallback: str = "official"  # "best": no positive component score -> keep only the best one
    crf_aspect: str = "squash"  # "keep": CRF at the image's aspect ratio instead of a 224x224 squash
    crf_uniform: str = "official"  # "keep": an all-foreground CRF result stays (official: written empty)
    # Opt-in, not part of either method: images judged without the group's object get no mask
    # (cosod.absence). Off: not hashed into version_id, so the default version is unchanged.
    absence: bool = False
    absence_z: float = ABSENCE_Z

    def __post_init__(self) -> None:
        get_method(self.model)  # UnknownMethodError (a ValueError) naming the known models
        if self.threshold not in ("auto", "group", "map"):
            raise ValueError(f"threshold must be 'auto', 'group' or 'map', got {self.threshold!r}")
        if self.stage1_init not in ("identity", "seeded"):
            raise ValueError(f"stage1_init must be 'identity' or 'seeded', got {self.stage1_init!r}")
        if self.max_refs < 2:
            raise ValueError(f"max_refs must be at least 2, got {self.max_refs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.absence_z > 0:
            raise ValueError(f"absence_z must be > 0, got {self.absence_z}")
        check_precision(self.feature_precision)
        for name, value, allowed in (
            ("refine_fallback", self.refine_fallback, REFINE_FALLBACKS),
            ("crf_aspect", self.crf_aspect, CRF_ASPECTS),
            ("crf_uniform", self.crf_uniform, CRF_UNIFORMS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class GroupPrediction:
    """Per image, in input order: ``soft`` float32 HxW in [0, 1] (stage-1 map at the original size),
    ``masks`` bool HxW at the original size, ``scores`` in [0, 1] (mean soft value inside the mask, 0 when the
    mask is empty). ``mask_maps`` uint8 HxW: the official output (the 224x224 mask as 0/255, resized with
    OpenCV's INTER_LINEAR, so its edges are soft); ``masks`` is ``mask_maps > 127``. ``timings`` holds seconds
    per stage for the whole group."""

    soft: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    mask_maps: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    mode: str = "empty"
    thresholds: list[float] = field(default_factory=list)
    references: list[int] = field(default_factory=list)
    regions: list[RegionDecision | None] = field(default_factory=list)
    absence: AbsenceDecision | None = None  # with PipelineConfig.absence: the decision and its evidence

    def __len__(self) -> int:
        return len(self.masks)


def _check_images(images: Sequence[np.ndarray]) -> None:
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
            raise ValueError(f"image {i}: expected an HxWx3 uint8 RGB array, got {desc}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"image {i}: empty image of shape {img.shape}")


class Pipeline:
    """Encode a group once, then threshold, refine and CRF it. Build with :meth:`build`.

    The method (``config.model``, looked up in :data:`cosod.methods.METHODS`) decides the backbones and the
    head: ``model == "scosparc"``: one backbone + a :class:`~cosod.scosparc.Stage1Net`; ``model == "ums"``: a
    DINO and a DINOv2 backbone + a :class:`~cosod.ums.checkpoint.UMSCheckpoint`. ``head`` (or, by its former
    name, ``ums``) is the method's head; ``v2_backbone`` the second backbone of a two-backbone method.
    """

    def __init__(
        self,
        config: PipelineConfig,
        backbone: Backbone,
        head: Any = None,
        cache: FeatureCache | None = None,
        *,
        ums: Any = None,
        v2_backbone: Backbone | None = None,
        crf_workers: int | None = None,
    ):
        self.config = config
        self.method: Method = get_method(config.model)
        # processes for a group's CRFs; not part of the config: it changes the speed, never a mask
        self.crf_workers = default_workers() if crf_workers is None else max(1, int(crf_workers))
        if config.crf:
            prestart(self.crf_workers)  # the CRF processes start while the caller does other things
        self.cache = cache
        self.backbones = [backbone] + ([v2_backbone] if v2_backbone is not None else [])
        head = head if head is not None else ums
        name = self.method.name
        if head is None:
            raise ValueError(f"model {name!r} needs a head (a trained network or checkpoint)")
        if len(self.backbones) != self.method.n_backbones:
            raise ValueError(
                f"model {name!r} needs {self.method.n_backbones} backbone(s), got {len(self.backbones)}"
            )
        self.method.check(head, self.backbones)
        self.method.module(head).eval().to(backbone.device)
        self.head = head
        default_threshold, default_bm_bar = self.method.threshold, self.method.bm_bar(head)
        self.threshold = default_threshold if config.threshold == "auto" else config.threshold
        self.bm_bar = default_bm_bar if config.bm_bar is None else config.bm_bar
        self._version_id = self._compute_version_id()

    @property
    def backbone(self) -> Backbone:
        """The first backbone (DINO): the device, the token grid and the base model's ``backbone_id``."""
        return self.backbones[0]

    @property
    def v2_backbone(self) -> Backbone | None:
        """The second backbone of a two-backbone method (UMS's DINOv2), else None."""
        return self.backbones[1] if len(self.backbones) > 1 else None

    @property
    def stage1(self) -> Any:
        """The head under its former SCoSPARC name (a Stage1Net for ``model == "scosparc"``)."""
        return self.head

    @property
    def ums(self) -> Any:
        """The head under its former UMS name (a UMSCheckpoint for ``model == "ums"``)."""
        return self.head

    @classmethod
    def build(
        cls,
        config: PipelineConfig | None = None,
        *,
        weights_dir: str | None = None,
        cache_dir: str | None = None,
        device: str = "cpu",
        crf_workers: int | None = None,
    ) -> Pipeline:
        """Load the backbone(s) (raises :class:`~cosod.errors.WeightsMissingError` without their files) and
        the head, as the method decides (:meth:`cosod.methods.base.Method.build`): SCoSPARC the stage-1
        checkpoint or its ``stage1_init`` variant on ``config.backbone``; UMS its checkpoint, whose recorded
        backbones are used. ``crf_workers``: processes for a group's CRFs (None: the CPUs, at most 8; 1: none,
        the CRFs run in this process)."""
        cfg = config or PipelineConfig()
        cache = FeatureCache(cache_dir) if cache_dir else None

        def make_backbone(name: str) -> Backbone:
            return build_backbone(
                name, weights_dir=weights_dir, device=device, input_size=cfg.input_size, amp=cfg.backbone_amp
            )

        head, backbones = get_method(cfg.model).build(cfg, make_backbone)
        v2 = backbones[1] if len(backbones) > 1 else None
        return cls(cfg, backbones[0], head, cache, v2_backbone=v2, crf_workers=crf_workers)

    def _compute_version_id(self) -> str:
        cfg = asdict(self.config)
        for volatile in ("batch_size", "stage1_checkpoint", "ums_checkpoint"):
            cfg.pop(volatile)  # the weights themselves are hashed below
        if not self.config.absence:  # an opt-in added later: off, the version stays what it was
            cfg.pop("absence")
            cfg.pop("absence_z")
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
        for backbone in self.backbones:
            h.update(backbone.id.encode())
        for name, tensor in sorted(self.method.module(self.head).state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        h.update(f"{self.threshold}:{self.bm_bar}".encode())
        return h.hexdigest()[:16]

    @property
    def version_id(self) -> str:
        """Stable id of config + backbone weights + model weights; changes when any of them changes."""
        return self._version_id

    def encode(
        self, images: Sequence[np.ndarray], hashes: Sequence[str] | None = None, *, v2: bool = False
    ) -> BackboneFeatures:
        """Features of ``images`` from the backbone (``v2``: the second backbone, UMS's DINOv2), through the
        cache."""
        backbone = self.v2_backbone if v2 else self.backbone
        assert backbone is not None
        return self._encode(backbone, images, hashes)

    def encode_all(
        self, images: Sequence[np.ndarray], hashes: Sequence[str] | None = None
    ) -> list[BackboneFeatures]:
        """Features of ``images`` from every backbone of the method, in its order, through the cache."""
        return [self._encode(b, images, hashes) for b in self.backbones]

    def _encode(
        self, backbone: Backbone, images: Sequence[np.ndarray], hashes: Sequence[str] | None
    ) -> BackboneFeatures:
        return encode_images(
            backbone,
            images,
            cache=self.cache,
            hashes=hashes,
            batch_size=self.config.batch_size,
            precision=self.config.feature_precision,
        )

    def stage1_maps(self, feats: BackboneFeatures, hashes: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """SCoSPARC: (B, h, w) soft maps and the reference indices used. One image: its saliency."""
        return stage1_maps(
            self.head, feats, hashes, max_refs=self.config.max_refs, device=self.backbone.device
        )

    def ums_maps(self, feats: BackboneFeatures, feats2: BackboneFeatures, hashes: Sequence[str]) -> ModelMaps:
        """UMS: the maps of a group from its DINO and DINOv2 features (see :mod:`cosod.methods.ums`)."""
        return self.head_maps([feats, feats2], hashes)

    def head_maps(self, feats: Sequence[BackboneFeatures], hashes: Sequence[str]) -> ModelMaps:
        """The method's maps of a group from its features (one per backbone)."""
        return self.method.maps(
            self.head,
            feats,
            hashes,
            max_refs=self.config.max_refs,
            size=self.config.input_size,
            device=self.backbone.device,
        )

    def model_maps(self, images: Sequence[np.ndarray], digests: Sequence[str]) -> tuple[ModelMaps, float]:
        """Encode (timed apart) and run the model; returns the maps and the encoding seconds."""
        t0 = time.perf_counter()
        feats = self.encode_all(images, digests)
        t1 = time.perf_counter()
        return self.head_maps(feats, digests), t1 - t0

    def predict_group(
        self,
        images: Sequence[np.ndarray],
        *,
        hashes: Sequence[str] | None = None,
        absence: bool | None = None,
    ) -> GroupPrediction:
        """Masks for a group. images: list of HxWx3 uint8 RGB arrays, any sizes; hashes: their
        :func:`~cosod.features.image_hash` values if already known; absence: run the absence decision
        (None: ``config.absence``; see :meth:`masks_from_maps`)."""
        _check_images(images)
        if not images:
            return GroupPrediction(mode="empty")
        t0 = time.perf_counter()
        digests = list(hashes) if hashes is not None else [image_hash(im) for im in images]
        maps, encode_seconds = self.model_maps(images, digests)
        t1 = time.perf_counter()
        pred = self.masks_from_maps(images, maps, absence=absence)
        pred.references = maps.references
        pred.mode = "single" if len(images) == 1 else "group"
        pred.timings = {"backbone": encode_seconds, "stage1": t1 - t0 - encode_seconds, **pred.timings}
        pred.timings["total"] = time.perf_counter() - t0
        return pred

    def masks_from_maps(
        self,
        images: Sequence[np.ndarray],
        maps: ModelMaps,
        *,
        prototype: torch.Tensor | None = None,
        absence: bool | None = None,
        thresholds: torch.Tensor | None = None,
    ) -> GroupPrediction:
        """RRBE: adaptive threshold, region refinement and CRF of a model's maps (shared by both models).

        ``prototype`` (C,): the group prototype the regions are scored against, in the space of
        ``maps.proto_tokens`` (None: F_G from the thresholded maps, the official way; propagation passes the
        corrections' foreground prototype). ``absence``: run the absence decision (:mod:`cosod.absence`;
        None: ``config.absence``); an image judged without the object gets an empty mask (score 0).
        ``thresholds`` (B,): the maps' thresholds (None: the adaptive threshold of ``config``, the official
        way; propagation passes the decision boundary of its exemplars)."""
        cfg = self.config
        judge = cfg.absence if absence is None else absence
        t0 = time.perf_counter()
        work = maps.work
        grid = (int(maps.proto_tokens.shape[1]), int(maps.proto_tokens.shape[2]))
        if thresholds is not None:
            th = torch.as_tensor(thresholds, dtype=work.dtype).reshape(len(images))
        elif self.threshold == "group":
            th = torch.full(
                (len(images),),
                group_threshold(work, grid, th0=cfg.th0, alpha_c=cfg.alpha_c, bm_bar=self.bm_bar),
            )
        else:
            th = map_thresholds(work, th0=cfg.th0, alpha_c=cfg.alpha_c, bm_bar=self.bm_bar)
        binary_work = (work >= th[:, None, None]).numpy()
        regions: list[RegionDecision | None] = [None] * len(images)
        if cfg.refine or judge:
            if prototype is not None:
                proto = prototype
            else:
                if maps.grid_maps is not None:
                    grid_masks = maps.grid_maps >= th[:, None, None]
                else:
                    grid_masks = torch.from_numpy(
                        np.stack([component_grid_masks(b.astype(np.int64), 1, grid)[0] for b in binary_work])
                    )
                proto = group_prototype(maps.proto_tokens, grid_masks)
            for i in range(len(images)):
                refined, regions[i] = refine_regions(
                    binary_work[i],
                    maps.proto_tokens[i],
                    proto,
                    box_sim=cfg.box_sim,
                    fallback=cfg.refine_fallback,
                )
                if cfg.refine:
                    binary_work[i] = refined
        decision = decide_from_regions(regions, z_threshold=cfg.absence_z) if judge else None
        if decision is not None:
            for i in decision.absent:
                binary_work[i] = False
        t1 = time.perf_counter()
        final: list[np.ndarray] = list(binary_work)
        if cfg.crf:
            try:
                final = crf_refine_group(
                    images,
                    list(binary_work),
                    cfg.crf_params,
                    aspect=cfg.crf_aspect,
                    uniform=cfg.crf_uniform,
                    workers=self.crf_workers,
                )
            except Exception as exc:  # pydensecrf raises plain Exceptions on bad inputs; a worker may die
                log.warning(
                    "dense CRF failed (%s); the group is written without CRF, as the official code does", exc
                )
        mask_maps = [output_map(final[i], img.shape[:2]) for i, img in enumerate(images)]
        masks = [m > 127 for m in mask_maps]
        t2 = time.perf_counter()
        soft = [resize_soft(work[i].numpy(), img.shape[:2]) for i, img in enumerate(images)]
        scores = [float(s[m].mean()) if m.any() else 0.0 for s, m in zip(soft, masks, strict=True)]
        return GroupPrediction(
            soft=soft,
            masks=masks,
            mask_maps=mask_maps,
            scores=scores,
            timings={"refine": t1 - t0, "crf": t2 - t1, "resize": time.perf_counter() - t2},
            thresholds=[float(t) for t in th],
            regions=regions,
            absence=decision,
        )


def describe(config: PipelineConfig) -> dict[str, Any]:
    """JSON-friendly view of a config (for checkpoints, /health and reports)."""
    return asdict(config)
