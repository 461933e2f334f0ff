"""cosod.methods: the registry, model versions that survive refactors, and a third method plugged in from
a test alone (the proof that a new method touches one folder)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cosod import finetune as ft
from cosod.backbones import Backbone, BackboneFeatures, build_backbone
from cosod.cli import build_parser
from cosod.data import Group, make_synthetic_dataset, synthetic_group
from cosod.errors import UnknownMethodError
from cosod.features import FeatureCache, image_hash
from cosod.methods import (
    METHODS,
    Batch,
    HeadRecord,
    LossWeights,
    Method,
    ModelMaps,
    TrainDefaults,
    TrainGroup,
    get_method,
    register,
)
from cosod.methods.base import MakeBackbone, choose_references
from cosod.methods.scosparc import mask_to_grid
from cosod.pipeline import Pipeline, PipelineConfig
from cosod.refine import upsample
from cosod.scosparc import Stage1Net
from cosod.train import TrainConfig, encode_groups, train
from cosod.ums.checkpoint import UMSCheckpoint
from cosod.ums.net import UMSNet

# Pipeline.version_id of fixed heads on the tiny backbones, computed on commit 189c0cb (before the method
# protocol existed). A change here means every deployed model_version changes: Label Studio would see new
# versions and re-predict everything.
PINNED = {"identity": "c363aa3d0cdb39b8", "seeded": "59c084932478b6c4", "ums": "bf49d166d1976991"}


def test_version_ids_are_pinned() -> None:
    bb = build_backbone("tiny")
    assert Pipeline.build(PipelineConfig(backbone="tiny"), crf_workers=1).version_id == PINNED["identity"]
    seeded = Pipeline(PipelineConfig(backbone="tiny"), bb, Stage1Net.seeded(bb.embed_dim), crf_workers=1)
    assert seeded.version_id == PINNED["seeded"]
    dino, v2 = build_backbone("tiny", input_size=112), build_backbone("tiny_dinov2", input_size=112)
    net = UMSNet.build(seed=0, dim=dino.embed_dim, v2_dim=v2.embed_dim, width=8)
    ckpt = UMSCheckpoint(net=net, backbone="tiny", v2_backbone="tiny_dinov2", bm_bar=0.4)
    cfg = PipelineConfig(model="ums", input_size=112)
    ums = Pipeline(cfg, dino, None, None, ums=ckpt, v2_backbone=v2, crf_workers=1)
    assert ums.version_id == PINNED["ums"]


# -- the registry -------------------------------------------------------------------------------------------


def test_the_built_in_methods_and_their_training_defaults() -> None:
    assert list(METHODS) == ["scosparc", "ums"]
    s, u = get_method("scosparc"), get_method("ums")
    assert (s.n_backbones, s.threshold, s.checkpoint_field) == (1, "group", "stage1_checkpoint")
    assert (u.n_backbones, u.threshold, u.checkpoint_field) == (2, "map", "ums_checkpoint")
    assert s.train_defaults == TrainDefaults(epochs=150, weight_decay=1e-4, betas=(0.9, 0.99))
    assert u.train_defaults == TrainDefaults(epochs=100, weight_decay=0.0, betas=(0.9, 0.999))
    cfg = TrainConfig(model="ums", backbone="tiny")
    assert (cfg.epochs, cfg.weight_decay, cfg.betas) == (100, 0.0, (0.9, 0.999))


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownMethodError, match="unknown model 'yolo'; known: scosparc, ums"):
        get_method("yolo")
    with pytest.raises(ValueError, match="unknown model 'yolo'"):
        TrainConfig(model="yolo")
    with pytest.raises(TypeError, match="cosod.methods.Method"):
        register(object())  # type: ignore[arg-type]


# -- a third method, defined here and nowhere else ----------------------------------------------------------


class ToyHead(nn.Module):
    """tokens (B, h, w, C) -> maps (B, h, w) in (0, 1): a linear score per token, then a sigmoid."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.score = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.score(tokens)[..., 0])


class Toy(Method):
    """One backbone, a per-token linear head; self-supervised: maps follow the CLS attention (MSE);
    fine-tuning: BCE against the corrections at the token grid."""

    name = "toy"
    n_backbones = 1
    threshold = "map"
    train_defaults = TrainDefaults(epochs=3, weight_decay=0.0, betas=(0.9, 0.999))

    def build(self, config: PipelineConfig, make_backbone: MakeBackbone) -> tuple[Any, list[Backbone]]:
        backbone = make_backbone(config.backbone)
        return self._new(backbone.embed_dim), [backbone]

    @staticmethod
    def _new(dim: int, seed: int = 0) -> ToyHead:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ToyHead(dim)

    def module(self, head: Any) -> nn.Module:
        return head

    def bm_bar(self, head: Any) -> float:
        return 0.4

    def load_head(self, path: str | os.PathLike[str]) -> Any:
        raw = torch.load(path, weights_only=True)
        head = ToyHead(int(raw["dim"]))
        head.load_state_dict(raw["state_dict"])
        return head

    def save_head(
        self, head: Any, path: str | os.PathLike[str], record: HeadRecord, backbones: Sequence[Backbone]
    ) -> Any:
        torch.save({"dim": head.dim, "state_dict": head.state_dict(), "record": asdict(record)}, path)
        return head

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
        with torch.no_grad():
            grid = head(feats[0].tokens.to(device)).float().cpu()
        return ModelMaps(upsample(grid, size), feats[0].tokens, grid, choose_references(hashes, max_refs))

    def loss(
        self, module: nn.Module, batch: Batch, weights: LossWeights
    ) -> tuple[torch.Tensor, dict[str, float]]:
        maps = module(batch.feats[0].tokens)
        if batch.targets is None:
            loss = F.mse_loss(maps, batch.feats[0].cls_attention)
        else:
            rows = batch.labelled if batch.labelled is not None else torch.ones(len(batch), dtype=torch.bool)
            if bool(rows.any()):
                loss = F.binary_cross_entropy(maps[rows], batch.targets[rows])
            else:  # no corrected image in this subset
                loss = maps.sum() * 0.0
        return loss, {"loss": float(loss.detach())}

    def targets(
        self, masks: Sequence[np.ndarray | None], feats: Sequence[BackboneFeatures], size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grid = feats[0].grid
        rows = [torch.zeros(grid) if m is None else mask_to_grid(m, grid) for m in masks]
        return torch.stack(rows), torch.tensor([m is not None for m in masks])

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
        encoded = encode_groups(groups, backbones[0], cache, progress=progress)
        usable = [TrainGroup(g.name, g.hashes) for g in encoded if len(g.hashes) >= 2]
        return usable, [p for g in encoded for p in g.skipped]

    def new_head(self, backbones: Sequence[Backbone], config: TrainConfig) -> Any:
        return self._new(backbones[0].embed_dim, config.seed)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Toy]:
    """The toy method, registered for one test only."""
    method = Toy()
    monkeypatch.setitem(METHODS, "toy", method)
    yield method


def _groups(n_groups: int, n_images: int) -> list[ft.FinetuneGroup]:
    out = []
    for g in range(n_groups):
        imgs, masks = synthetic_group(n_images, size=(48, 64), seed=30 + g)
        kept = [m if k % 2 == 0 else None for k, m in enumerate(masks)]
        out.append(ft.FinetuneGroup(f"g{g}", imgs, [image_hash(i) for i in imgs], kept))
    return out


def test_a_third_method_predicts_and_fine_tunes_through_the_registry(toy: Toy) -> None:
    pipe = Pipeline.build(PipelineConfig(model="toy", backbone="tiny", crf=False), crf_workers=1)
    assert isinstance(pipe.head, ToyHead) and pipe.threshold == "map" and pipe.bm_bar == 0.4
    groups = _groups(2, 5)
    pred = pipe.predict_group(groups[0].images, hashes=groups[0].hashes)
    assert pred.mode == "group" and len(pred) == 5 and len(set(pred.thresholds)) > 1
    for img, mask in zip(groups[0].images, pred.masks, strict=True):
        assert mask.shape == img.shape[:2] and mask.dtype == bool

    before = {k: v.clone() for k, v in pipe.head.state_dict().items()}
    seen: list[float] = []
    res = ft.finetune(
        pipe, groups, ft.FinetuneConfig(steps=4, lr=1e-2), on_step=lambda s, r: seen.append(r["loss"])
    )
    assert len(seen) == 4 and res.train_metrics["steps"] == 4
    assert all(torch.equal(v, before[k]) for k, v in pipe.head.state_dict().items())  # the active head
    assert not torch.equal(res.head.score.weight, before["score.weight"])  # the candidate moved
    cand = ft.head_pipeline(pipe, res.head)
    assert cand.version_id != pipe.version_id
    assert len(cand.predict_group(groups[1].images, hashes=groups[1].hashes)) == 5
    # the CLI offers it, as every registered method
    args = build_parser().parse_args(["predict", "in", "--out", "out", "--model", "toy"])
    assert args.model == "toy"


def test_a_third_method_trains_from_scratch_and_round_trips_its_checkpoint(toy: Toy, tmp_path: Path) -> None:
    data = make_synthetic_dataset(tmp_path / "data", n_groups=2, n_images=3, size=(48, 64), seed=1)
    cfg = TrainConfig(model="toy", backbone="tiny")
    assert cfg.epochs == 3  # the method's own default
    head = train(data, cfg, out=tmp_path / "toy.pt", cache_dir=tmp_path / "cache")
    back = toy.load_head(tmp_path / "toy.pt")
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in back.state_dict().items())
    record = torch.load(tmp_path / "toy.pt", weights_only=True)["record"]
    assert record["metrics"]["steps"] == 6 and len(record["metrics"]["epoch_loss"]) == 3
    assert len(record["data_ids"]) == 6 and record["config"]["backbone_id"]
