"""Versions, promotion, rollback and the fine-tune job on a real SQLite file with the tiny backbone.

The project: 3 synthetic groups (``cosod.data.synthetic_group``, whose masks are the truth) of 10 images;
8 images per group are corrected with their true masks, 2 are left to the group as uncorrected context.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hostile_input import big_png

from backend.grouping import GroupKey, TaskRef
from backend.learning.corrections import encode_group_key
from backend.learning.finetune import run_finetune
from backend.learning.store import Store
from backend.learning.versions import Registry, VersionRecord
from cosod import finetune as ft
from cosod.data import synthetic_group
from cosod.pipeline import Pipeline, PipelineConfig
from cosod.scosparc import Stage1Checkpoint, Stage1Net, load_stage1, save_stage1

ROOT = Path(__file__).resolve().parents[1]
PROJECT = 12
BASE = "scosparc-p12-0a1b2c3d"
N_GROUPS, N_IMAGES, N_CORRECTED = 3, 10, 8
CONFIG = ft.FinetuneConfig(steps=150, lr=3e-3)


def build_project(
    root: Path,
) -> tuple[Store, Registry, Callable[..., np.ndarray], Callable[[int], list[TaskRef]]]:
    """Store the corrections; return the store, registry, read_image and list_group_tasks."""
    store = Store(root)
    images: dict[str, np.ndarray] = {}
    tasks: list[TaskRef] = []
    for g in range(N_GROUPS):
        imgs, masks = synthetic_group(N_IMAGES, size=(72, 96), seed=20 + g)
        for k, (img, mask) in enumerate(zip(imgs, masks, strict=True)):
            tid = 100 * g + k
            url = f"/data/upload/{PROJECT}/g{g}-{k}.png"
            images[url] = img
            tasks.append(TaskRef(tid, {"image": url, "group": f"g{g}"}))
            if k < N_CORRECTED:
                store.put_correction(
                    project=PROJECT,
                    annotation_id=1000 + tid,
                    task_id=tid,
                    group_key=encode_group_key(GroupKey("field:group", f"g{g}")),
                    image_url=url,
                    mask=mask,
                )

    def read_image(url: str, task_id: int) -> np.ndarray:
        return images[url]

    return store, Registry(store), read_image, lambda project: list(tasks)


def finetune_job(root: Path, pipeline: Pipeline, **kw: Any) -> dict[str, Any]:
    """The job as the queue runs it (re-storing the same corrections is a no-op)."""
    store, registry, read_image, list_tasks = build_project(root)
    return run_finetune(
        PROJECT,
        store=store,
        registry=registry,
        base_pipeline=pipeline,
        base_version=BASE,
        read_image=read_image,
        list_group_tasks=list_tasks,
        config=kw.pop("config", CONFIG),
        **kw,
    )


@pytest.fixture(scope="module")
def real_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny pipeline as served (threshold, refinement, CRF) with a feature cache."""
    return Pipeline.build(PipelineConfig(backbone="tiny"), cache_dir=str(tmp_path_factory.mktemp("features")))


@pytest.fixture(scope="module")
def fast_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """Without the CRF, for the tests that need a fine-tune but not its exact scores."""
    cache = str(tmp_path_factory.mktemp("features_fast"))
    return Pipeline.build(PipelineConfig(backbone="tiny", crf=False), cache_dir=cache)


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, real_pipeline: Pipeline) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("registry")
    return root, finetune_job(root, real_pipeline)


@pytest.mark.slow
def test_finetune_beats_the_active_version_on_heldout_images(first: tuple[Path, dict[str, Any]]) -> None:
    root, out = first
    before, after = out["active_scores"], out["scores"]
    print(
        f"held-out ({out['heldout']} images): IoU {before['iou']:.4f} -> {after['iou']:.4f}, "
        f"max F {before['max_f']:.4f} -> {after['max_f']:.4f}, "
        f"MAE {before['mae']:.4f} -> {after['mae']:.4f}, "
        f"HCE {before['hce']:.2f} -> {after['hce']:.2f}; {out['train_seconds']:.1f} s training"
    )
    assert out["status"] == "promoted" and out["version"] == "scosparc-p12-v1" and out["parent"] == BASE
    assert after["iou"] > before["iou"] + 0.005
    assert out["heldout"] + out["train_images"] == N_GROUPS * N_CORRECTED
    assert out["images"] == N_GROUPS * N_IMAGES
    # the evidence: 8 held-out images (by their hashes), the bootstrap's bound above the margin
    ev = out["evidence"]
    print(out["decision"])
    assert ev["n"] == out["heldout"] == 8 and ev["promoted"] and out["decision"].startswith("promoted: iou")
    assert ev["mean_gain"] == pytest.approx(after["iou"] - before["iou"]) and ev["lower"] > 0.005
    rule = {"metric": "iou", "margin": 0.005, "min_heldout": 5, "confidence": 0.95, "resamples": 2000}
    assert ev["rule"] == {**rule, "seed": 0}


@pytest.mark.slow
def test_registry_records_and_serves_the_new_version(
    first: tuple[Path, dict[str, Any]], real_pipeline
) -> None:
    root, out = first
    store = Store(root)
    reg = Registry(store)
    assert store.pending(PROJECT) == 0
    assert all(c.image_hash for c in store.corrections(PROJECT))  # filled in by the job
    versions = reg.list_versions(PROJECT)
    assert [(v.version, v.status) for v in versions] == [(BASE, "base"), ("scosparc-p12-v1", "active")]
    v1 = versions[1]
    assert v1.parent == BASE and v1.promoted and v1.scores["iou"] == out["scores"]["iou"]
    assert versions[0].scores["iou"] == out["active_scores"]["iou"]
    assert len(v1.data_ids) == out["train_images"] and not set(v1.data_ids) & set(v1.heldout_ids)
    assert v1.evidence == out["evidence"] and v1.decision == out["decision"]
    assert sorted(image for _, image in (i["image"] for i in v1.evidence["images"])) == v1.heldout_ids
    ckpt = load_stage1(v1.path)
    assert ckpt.parent == BASE and ckpt.metrics["heldout"]["iou"] == out["scores"]["iou"]
    assert ckpt.metrics["promotion"]["lower"] == out["evidence"]["lower"]
    assert ckpt.config["finetune"]["steps"] == CONFIG.steps
    pipe, version = reg.serving(PROJECT, real_pipeline, BASE)
    assert version == "scosparc-p12-v1"
    assert pipe.backbone is real_pipeline.backbone and pipe.cache is real_pipeline.cache
    for k, v in ckpt.net.state_dict().items():
        assert torch.equal(pipe.stage1.state_dict()[k], v)
    assert reg.serving(PROJECT, real_pipeline, BASE)[0] is pipe  # cached per (project, version)
    assert reg.serving(99, real_pipeline, "scosparc-p99-00000000") == (real_pipeline, "scosparc-p99-00000000")


@pytest.mark.slow
def test_rollback_and_forward_with_promote(first: tuple[Path, dict[str, Any]], real_pipeline) -> None:
    root, _ = first
    reg = Registry(Store(root))
    reg.promote(PROJECT, BASE)
    assert reg.serving(PROJECT, real_pipeline, BASE) == (real_pipeline, BASE)
    assert {v.version: v.status for v in reg.list_versions(PROJECT)}["scosparc-p12-v1"] == "retired"
    reg.promote(PROJECT, "scosparc-p12-v1")
    assert reg.serving(PROJECT, real_pipeline, BASE)[1] == "scosparc-p12-v1"
    with pytest.raises(ValueError, match="'scosparc-p12-v9'"):
        reg.promote(PROJECT, "scosparc-p12-v9")


@pytest.mark.slow
def test_a_worse_candidate_is_recorded_but_not_promoted(
    tmp_path: Path, fast_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ft.finetune

    def sabotaged(*args: Any, **kw: Any) -> ft.FinetuneResult:
        res = real(*args, **kw)
        with torch.no_grad():  # flip the queries: the map now peaks where the common object is not
            res.head.query.weight.neg_()
            res.head.query.bias.neg_()
        return res

    monkeypatch.setattr(ft, "finetune", sabotaged)
    out = finetune_job(tmp_path, fast_pipeline, config=ft.FinetuneConfig(steps=20, lr=3e-3))
    print(
        f"sabotaged candidate: IoU {out['active_scores']['iou']:.4f} (active) vs {out['scores']['iou']:.4f}"
    )
    assert out["status"] == "rejected" and out["active"] == BASE
    reg = Registry(Store(tmp_path))
    rec = reg.get(PROJECT, "scosparc-p12-v1")
    assert rec is not None and rec.status == "rejected" and not rec.promoted and "kept" in rec.decision
    assert rec.scores["iou"] < rec.active_scores["iou"]
    assert reg.serving(PROJECT, fast_pipeline, BASE) == (fast_pipeline, BASE)
    assert Store(tmp_path).pending(PROJECT) == 0  # the corrections were used; the counter starts again


def test_margin_and_metric_decide(tmp_path: Path, fast_pipeline: Pipeline) -> None:
    out = finetune_job(
        tmp_path, fast_pipeline, config=ft.FinetuneConfig(steps=20, lr=3e-3), promote_margin=1.0
    )
    assert out["status"] == "rejected"  # nothing improves IoU by a whole point
    with pytest.raises(ValueError, match="'f1'"):
        finetune_job(tmp_path, fast_pipeline, promote_metric="f1", config=ft.FinetuneConfig(steps=2))


def test_too_few_heldout_images_keep_the_candidate_until_promoted_by_hand(
    tmp_path: Path, fast_pipeline: Pipeline
) -> None:
    # margin -1 would promote any candidate; 8 held-out images are under a minimum of 9
    cfg = ft.FinetuneConfig(steps=5, lr=3e-3)
    out = finetune_job(tmp_path, fast_pipeline, config=cfg, promote_margin=-1.0, promote_min_heldout=9)
    assert out["status"] == "rejected" and out["active"] == BASE and out["heldout"] == 8
    assert out["decision"] == "kept: 8 held-out images, promotion needs at least 9"
    assert out["evidence"]["n"] == 8 and out["evidence"]["lower"] is None
    reg = Registry(Store(tmp_path))
    rec = reg.get(PROJECT, "scosparc-p12-v1")
    assert rec is not None and rec.status == "rejected" and rec.decision == out["decision"]
    reg.promote(PROJECT, "scosparc-p12-v1")  # what `cosod-backend promote` does
    assert reg.active_name(PROJECT) == "scosparc-p12-v1"
    assert reg.serving(PROJECT, fast_pipeline, BASE)[1] == "scosparc-p12-v1"


def test_too_few_corrections_skips_and_resets(tmp_path: Path, real_pipeline: Pipeline) -> None:
    store = Store(tmp_path)
    img, mask = synthetic_group(1, size=(40, 40), seed=1)
    store.put_correction(
        project=5, annotation_id=1, task_id=1, group_key='["project", null]', image_url="u", mask=mask[0]
    )
    out = run_finetune(
        5,
        store=store,
        registry=Registry(store),
        base_pipeline=real_pipeline,
        base_version="scosparc-p5-00000000",
        read_image=lambda u, t: img[0],
    )
    assert out["status"] == "skipped" and store.pending(5) == 0
    assert Registry(store).list_versions(5) == []


def test_a_poisoned_stored_row_is_skipped_and_reported_by_the_finetune(
    tmp_path: Path, fast_pipeline: Pipeline
) -> None:
    """A 16384x16384 correction stored before the webhook checked sizes (written straight into SQLite):
    every fine-tune failed on it with DecompressionBombError; now it is skipped and listed."""
    store, _, _, _ = build_project(tmp_path)
    con = sqlite3.connect(store.path)
    try:
        con.execute(
            "INSERT INTO corrections (project, annotation_id, task_id, group_key, image_url, image_hash, "
            "mask_png, width, height, empty, digest, ls_updated, updated) "
            "VALUES (?, 999, 9, ?, 'u', NULL, ?, 16384, 16384, 1, 'd', '', 1.0)",
            (PROJECT, encode_group_key(GroupKey("field:group", "g0")), big_png(16384, 16384)),
        )
        con.commit()
    finally:
        con.close()
    stages: list[tuple[str, dict[str, Any]]] = []
    out = finetune_job(
        tmp_path,
        fast_pipeline,
        config=ft.FinetuneConfig(steps=5, lr=3e-3),
        promote_margin=-1.0,
        progress=lambda name, info: stages.append((name, info)),
    )
    assert out["status"] == "promoted" and out["corrections"] == N_GROUPS * N_CORRECTED
    reason = "the stored mask is 16384x16384, over the limit of 50000000 pixels"
    assert out["skipped_corrections"] == [
        {"project": PROJECT, "annotation_id": 999, "task_id": 9, "reason": reason}
    ]
    assert ("loaded", {"groups": N_GROUPS, "corrected": N_GROUPS * N_CORRECTED, "skipped": 1}) in stages
    assert finetune_job(tmp_path, fast_pipeline, min_corrections=1000)["skipped_corrections"][0][
        "reason"
    ] == (reason)


def _state(root: Path) -> tuple[str | None, list[tuple[str, str]], int, list[str]]:
    store = Store(root)
    reg = Registry(store)
    files = sorted(p.name for p in (root / "versions").rglob("*")) if (root / "versions").exists() else []
    return (
        reg.active_name(PROJECT),
        [(v.version, v.status) for v in reg.list_versions(PROJECT)],
        store.pending(PROJECT),
        files,
    )


def make_active_v1(root: Path, pipeline: Pipeline) -> None:
    """Register a (seeded, untrained) head as the active v1, cheaply, so a later fine-tune starts from it."""
    store, registry, _, _ = build_project(root)
    registry.ensure_base(PROJECT, "scosparc", BASE, {})
    path = registry.checkpoint_path(PROJECT, "scosparc-p12-v1")
    save_stage1(Stage1Checkpoint(net=Stage1Net.seeded(pipeline.backbone.embed_dim), parent=BASE), path)
    rec = VersionRecord(
        PROJECT,
        "scosparc-p12-v1",
        "scosparc",
        parent=BASE,
        path=str(path),
        config={"backbone_id": pipeline.backbone.id},
    )
    registry.register(rec, activate=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "saved"])
def test_a_finetune_killed_midway_leaves_the_active_version_serving(
    tmp_path: Path, fast_pipeline: Pipeline, stage: str
) -> None:
    make_active_v1(tmp_path, fast_pipeline)
    code = f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from pathlib import Path
        from cosod.finetune import FinetuneConfig
        from cosod.pipeline import Pipeline, PipelineConfig
        from test_backend_registry import finetune_job

        def progress(name, info):
            if name == {stage!r} and info.get("step", 10) >= 10:
                os.kill(os.getpid(), signal.SIGKILL)

        pipe = Pipeline.build(PipelineConfig(backbone="tiny", crf=False))
        finetune_job(Path({str(tmp_path)!r}), pipe, config=FinetuneConfig(steps=20), progress=progress)
        print("not killed", flush=True)
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "not killed" not in proc.stdout
    active, versions, pending, files = _state(tmp_path)
    assert active == "scosparc-p12-v1"
    assert versions == [(BASE, "base"), ("scosparc-p12-v1", "active")]
    assert pending == N_GROUPS * N_CORRECTED  # the corrections still wait for a fine-tune
    assert not [f for f in files if f.endswith(".tmp")]  # no half-written checkpoint
    if stage == "saved":
        assert "scosparc-p12-v2.pt" in files  # complete but never registered: not served
    else:
        assert files == ["finetune.lock", "p12", "scosparc-p12-v1.pt"]
    served = Registry(Store(tmp_path)).serving(PROJECT, fast_pipeline, BASE)
    assert served[1] == "scosparc-p12-v1"
    # the next run finds the killed one's marker, deletes its orphan and takes the number it left free
    out = finetune_job(tmp_path, fast_pipeline, config=ft.FinetuneConfig(steps=5), owner="again")
    assert out["version"] == "scosparc-p12-v2"
    assert out["recovered"]["starts"] == 2 and out["recovered"]["interrupted"]["starts"] == 1
    assert out["recovered"]["removed"] == (["scosparc-p12-v2.pt"] if stage == "saved" else [])
    assert [v for v, _ in _state(tmp_path)[1]] == [BASE, "scosparc-p12-v1", "scosparc-p12-v2"]
    assert _state(tmp_path)[3] == ["finetune.lock", "p12", "scosparc-p12-v1.pt", "scosparc-p12-v2.pt"]
    assert (tmp_path / "versions" / "p12" / "finetune.lock").read_bytes() == b""  # the marker is cleared


def test_an_exception_midway_changes_nothing(tmp_path: Path, fast_pipeline: Pipeline) -> None:
    def progress(name: str, info: dict[str, Any]) -> None:
        if name == "evaluated":
            raise RuntimeError("injected failure")

    with pytest.raises(RuntimeError, match="injected"):
        finetune_job(tmp_path, fast_pipeline, config=ft.FinetuneConfig(steps=5), progress=progress)
    active, versions, pending, files = _state(tmp_path)
    assert active == BASE and versions == [(BASE, "base")] and files == ["finetune.lock", "p12"]
    assert (tmp_path / "versions" / "p12" / "finetune.lock").read_bytes() == b""  # an exception clears it
    assert pending == N_GROUPS * N_CORRECTED  # still waiting for a fine-tune


def test_version_record_roundtrip(tmp_path: Path) -> None:
    reg = Registry(Store(tmp_path))
    with pytest.raises(ValueError, match="not found"):
        reg.register(
            VersionRecord(1, "scosparc-p1-v1", "scosparc", path=str(tmp_path / "nope.pt")), activate=True
        )
    reg.ensure_base(1, "scosparc", "scosparc-p1-abc", {})
    assert reg.active_name(1) == "scosparc-p1-abc" and reg.next_version(1, "scosparc") == "scosparc-p1-v1"


@pytest.mark.slow
def test_ums_project_finetunes_registers_and_serves_its_head(tmp_path: Path) -> None:
    from backend.learning.versions import load_head_pipeline
    from cosod.backbones import build_backbone
    from cosod.ums.checkpoint import UMSCheckpoint, load_ums
    from cosod.ums.net import UMSNet

    dino, v2 = build_backbone("tiny", input_size=112), build_backbone("tiny_dinov2", input_size=112)
    net = UMSNet.build(seed=0, dim=dino.embed_dim, v2_dim=v2.embed_dim, width=8)
    ckpt = UMSCheckpoint(net=net, backbone="tiny", v2_backbone="tiny_dinov2", bm_bar=0.4)
    base = Pipeline(
        PipelineConfig(model="ums", input_size=112, crf=False), dino, None, None, ums=ckpt, v2_backbone=v2
    )
    out = finetune_job(tmp_path, base, config=ft.FinetuneConfig(steps=6, lr=3e-3), promote_margin=-1.0)
    assert out["status"] == "promoted" and out["version"] == "ums-p12-v1"
    reg = Registry(Store(tmp_path))
    rec = reg.active(PROJECT)
    assert rec is not None and rec.model == "ums" and load_ums(rec.path).parent == BASE
    pipe, version = reg.serving(PROJECT, base, BASE)
    assert version == "ums-p12-v1" and pipe.v2_backbone is v2 and pipe.ums.net is not net
    assert load_head_pipeline(base, rec.path).bm_bar == pytest.approx(load_ums(rec.path).bm_bar)


def test_a_candidate_is_not_activated_when_the_active_version_changed_while_it_trained(
    tmp_path: Path,
) -> None:
    """Promoted (or rolled back) by hand during a fine-tune: the candidate's evidence was measured against
    its parent, not against what serves now, so it is kept, not activated over the hand-made choice."""
    reg = Registry(Store(tmp_path))
    reg.ensure_base(1, "scosparc", "scosparc-p1-base", {})
    for name in ("scosparc-p1-v1", "scosparc-p1-v2"):
        (tmp_path / f"{name}.pt").write_bytes(b"x")
    reg.register(
        VersionRecord(
            1,
            "scosparc-p1-v1",
            "scosparc",
            parent="scosparc-p1-base",
            path=str(tmp_path / "scosparc-p1-v1.pt"),
        ),
        activate=True,
    )
    reg.promote(1, "scosparc-p1-base")  # by hand, while v2 trains against v1
    late = reg.register(
        VersionRecord(
            1, "scosparc-p1-v2", "scosparc", parent="scosparc-p1-v1", path=str(tmp_path / "scosparc-p1-v2.pt")
        ),
        activate=True,
    )
    assert reg.active_name(1) == "scosparc-p1-base"
    assert late.status == "rejected" and "changed from scosparc-p1-v1 to scosparc-p1-base" in late.decision
