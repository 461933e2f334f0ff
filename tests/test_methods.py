"""cosod.methods: the registry, model versions that survive refactors, and a third method plugged in from
a test alone (the proof that a new method touches one folder)."""

from __future__ import annotations

from cosod.backbones import build_backbone
from cosod.pipeline import Pipeline, PipelineConfig
from cosod.scosparc import Stage1Net
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
