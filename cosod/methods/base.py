"""What a co-salient method gives the pipeline, training and fine-tuning: the :class:`Method` base class and
the data it exchanges with them.

Vocabulary:

- **backbones**: the frozen ViTs a method reads, in a fixed order (``n_backbones`` of them; SCoSPARC 1: DINO,
  UMS 2: DINO then DINOv2). Their features arrive as one :class:`~cosod.backbones.BackboneFeatures` per
  backbone, each ``tokens`` (B, h, w, C) float32 for the same B images in the same order.
- **head**: the trained part, whatever object the method keeps it in (SCoSPARC: a
  :class:`~cosod.scosparc.Stage1Net`; UMS: a :class:`~cosod.ums.checkpoint.UMSCheckpoint`, which also records
  its backbones and B_bar). :meth:`Method.module` gives the ``nn.Module`` inside it: the weights that are
  trained, copied for fine-tuning and hashed into :attr:`~cosod.pipeline.Pipeline.version_id`.
- **maps**: :class:`ModelMaps`, what the method hands to the shared thresholding, region refinement and CRF.
- **batch**: :class:`Batch`, one training group (features per backbone, optional targets); the method's
  :meth:`Method.loss` turns it into one scalar loss. The loop (:mod:`cosod.loop`) draws the groups and the
  image subsets and takes the optimiser steps, the same for every method.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone, BackboneFeatures

if TYPE_CHECKING:
    from ..data import Group
    from ..features import FeatureCache
    from ..pipeline import PipelineConfig
    from ..train import TrainConfig


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


@dataclass
class ModelMaps:
    """What a model hands to RRBE: soft maps at the working size, the features pooled into the region
    prototype, the maps at the token grid when the model has them (SCoSPARC's ``fg_wts``), the references."""

    work: torch.Tensor  # (B, S, S) in [0, 1], S = PipelineConfig.input_size
    proto_tokens: torch.Tensor  # (B, h, w, C)
    grid_maps: torch.Tensor | None  # (B, h, w) or None
    references: list[int]


@dataclass
class Batch:
    """One training group of B images.

    feats: one :class:`BackboneFeatures` per backbone of the method (same images, same order).
    targets: None for self-supervised training, else the method's targets for the B images (SCoSPARC:
        (B, h, w) float in [0, 1], the corrected foreground fraction per token; UMS: (B, S, S) 0/1 masks at
        the network's output size).
    labelled: (B,) bool, the rows of ``targets`` that hold a correction (None: all of them).
    """

    feats: tuple[BackboneFeatures, ...]
    targets: torch.Tensor | None = None
    labelled: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.feats[0])

    def select(self, index: Sequence[int]) -> Batch:
        """The images at ``index`` (rows of every tensor, in that order)."""
        idx = list(index)
        return Batch(
            tuple(f.select(idx) for f in self.feats),
            None if self.targets is None else self.targets[idx],
            None if self.labelled is None else self.labelled[idx],
        )


@dataclass(frozen=True)
class TrainDefaults:
    """A method's from-scratch training hyper-parameters (Adam); fine-tuning keeps the weight decay and
    betas."""

    epochs: int
    weight_decay: float
    betas: tuple[float, float]


@dataclass(frozen=True)
class LossWeights:
    """Weights of a training loss's terms: ``saliency`` SCoSPARC's L_sal (0.3); fine-tuning on corrections
    weighs the method's own (self-supervised) loss by ``self_supervised`` and the supervised term by
    ``supervised``. A method ignores the weights it has no term for."""

    saliency: float = 0.3
    self_supervised: float = 1.0
    supervised: float = 1.0


@dataclass
class HeadRecord:
    """The record saved beside a head's weights (nanoGPT-style): the version it was fine-tuned from, its
    config (including ``backbone_id``), the content hashes it was trained on, its metrics."""

    parent: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data_ids: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainGroup:
    """A prepared training group: content hashes of its readable images (their features are in the cache)
    and the method's targets for them (None for self-supervised training)."""

    name: str
    hashes: list[str]
    targets: torch.Tensor | None = None


MakeBackbone = Callable[[str], Backbone]
Loader = Callable[[int], Batch]


class Method(ABC):
    """A co-salient method. Subclass it, fill in the class attributes and the abstract methods, and add an
    instance to :data:`cosod.methods.METHODS` (:func:`cosod.methods.register`); nothing else changes.

    Class attributes:
        name: the registry key (``PipelineConfig.model``, ``TrainConfig.model``, ``--model``).
        n_backbones: how many backbones its features come from (see the module doc).
        threshold: its own threshold mode, "group" (one per group, SCoSPARC code) or "map" (one per map).
        train_defaults: epochs, weight decay and Adam betas of from-scratch training.
        checkpoint_field: the ``PipelineConfig`` field that names its head checkpoint (None: it has none).
        checkpoint_required: a pipeline cannot be built without that checkpoint (UMS: no untrained head).
        fills_uncorrected: fine-tuning gives the uncorrected training images the active model's masks as
            targets (UMS); False: they only enter the self-supervised term (SCoSPARC).
        finetune_reversed: fine-tuning walks each permutation of the groups from its end (SCoSPARC's
            historical order, kept so its results do not move).
    """

    name: str
    n_backbones: int = 1
    threshold: str = "group"
    train_defaults: TrainDefaults = TrainDefaults(epochs=100, weight_decay=0.0, betas=(0.9, 0.999))
    checkpoint_field: str | None = None
    checkpoint_required: bool = False
    fills_uncorrected: bool = False
    finetune_reversed: bool = False

    # -- heads --------------------------------------------------------------------------------------
    @abstractmethod
    def build(self, config: PipelineConfig, make_backbone: MakeBackbone) -> tuple[Any, list[Backbone]]:
        """The head and the backbones a pipeline with ``config`` serves with; ``make_backbone(name)`` builds
        one (raising WeightsMissingError without its file). Raises ValueError naming what is missing."""

    @abstractmethod
    def module(self, head: Any) -> nn.Module:
        """The trainable network inside ``head``."""

    def check(self, head: Any, backbones: Sequence[Backbone]) -> None:
        """Raise ValueError when ``head`` does not fit ``backbones`` (e.g. token channels). Default: fits."""
        return None

    def bm_bar(self, head: Any) -> float:
        """B_bar, the mean uncertainty the adaptive threshold expects of this head's maps."""
        from ..refine import BM_BAR

        return BM_BAR

    @abstractmethod
    def load_head(self, path: str | os.PathLike[str]) -> Any:
        """Read a head checkpoint (raises CheckpointError)."""

    @abstractmethod
    def save_head(
        self, head: Any, path: str | os.PathLike[str], record: HeadRecord, backbones: Sequence[Backbone]
    ) -> Any:
        """Write ``head`` with ``record`` atomically to ``path``; returns the checkpoint object written."""

    # -- inference ----------------------------------------------------------------------------------
    @abstractmethod
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
        """Maps of one group (B >= 1 images; ``feats`` one per backbone, ``hashes`` their content hashes):
        ``work`` (B, size, size) in [0, 1]; every image compared with at most ``max_refs`` references
        (:func:`choose_references`)."""

    # -- training -----------------------------------------------------------------------------------
    @abstractmethod
    def loss(
        self, module: nn.Module, batch: Batch, weights: LossWeights
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one group: a differentiable scalar and the record of the step (floats,
        ``"loss"`` first). With ``batch.targets`` None the self-supervised (from-scratch) loss, else the
        fine-tuning loss on the targets."""

    @abstractmethod
    def targets(
        self, masks: Sequence[np.ndarray | None], feats: Sequence[BackboneFeatures], size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine-tuning targets of B images from their masks (bool HxW at the original size, None where nobody
        corrected; with ``fills_uncorrected`` every mask is given): (targets, labelled (B,) bool)."""

    @abstractmethod
    def train_backbones(self, config: TrainConfig) -> tuple[str, ...]:
        """Backbone names from-scratch training with ``config`` encodes with."""

    @abstractmethod
    def prepare_training(
        self,
        groups: Sequence[Group],
        backbones: Sequence[Backbone],
        cache: FeatureCache,
        config: TrainConfig,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[list[TrainGroup], list[str]]:
        """Read and encode every group once (features into ``cache``), make any targets; returns the usable
        groups (2 or more readable images) and the paths of unreadable images. ``progress(n_images)``."""

    @abstractmethod
    def new_head(self, backbones: Sequence[Backbone], config: TrainConfig) -> Any:
        """An untrained head for ``backbones`` (deterministic from ``config.seed`` / ``config.init``)."""

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
        """The head after ``module`` (a trained copy of ``module(head)``) was trained on ``load(0..n-1)``, and
        metrics to add to the training record. Default: the module itself on the CPU, nothing to add."""
        return module.cpu().eval(), {}
