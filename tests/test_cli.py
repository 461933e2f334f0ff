"""The `cosod` command line end to end: train on synthetic groups, predict with the checkpoint, evaluate."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cosod.cli import main
from cosod.data import make_synthetic_dataset
from cosod.scosparc import load_stage1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, n_groups=2, n_images=4, size=(64, 80), seed=1)
    return root


def test_train_predict_eval(dataset, tmp_path, capsys):
    ckpt = tmp_path / "stage1.pt"
    rc = main(
        [
            "train",
            str(dataset),
            "--out",
            str(ckpt),
            "--backbone",
            "tiny",
            "--steps",
            "4",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    record = load_stage1(ckpt)
    assert record.backbone == "tiny" and record.metrics["steps"] == 4
    assert record.metrics["n_images"] == 8 and len(record.data_ids) == 8
    assert record.config["max_steps"] == 4 and record.config["lr"] == 1e-4
    assert "trained 4 steps on 2 groups / 8 images" in capsys.readouterr().out

    out = tmp_path / "pred"
    rc = main(
        [
            "predict",
            str(dataset),
            "--out",
            str(out),
            "--backbone",
            "tiny",
            "--checkpoint",
            str(ckpt),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    gts = sorted(p.relative_to(dataset / "gt") for p in (dataset / "gt").glob("*/*.png"))
    preds = sorted(p.relative_to(out) for p in out.glob("*/*.png"))
    assert preds == gts
    binary = tmp_path / "binary"
    argv = ["predict", str(dataset), "--backbone", "tiny", "--checkpoint", str(ckpt), "--binary"]
    assert main([*argv, "--out", str(binary), "--cache-dir", str(tmp_path / "cache")]) == 0
    for rel in preds:
        soft_edged = np.asarray(Image.open(out / rel))  # the official output: the 224x224 mask resized
        mask = np.asarray(Image.open(binary / rel))
        assert soft_edged.shape == mask.shape == (64, 80) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask == 255, soft_edged > 127)

    report = tmp_path / "report"
    rc = main(["eval", "--pred", str(out), "--gt", str(dataset), "--out", str(report)])
    assert rc == 0
    results = json.loads((report / "metrics.json").read_text())
    assert results["n_images"] == 8 and results["n_groups"] == 2
    assert 0.0 <= results["overall"]["mae"] <= 1.0 and 0.0 <= results["overall"]["iou"] <= 1.0
    assert (report / "pr_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "max_f" in (report / "metrics.txt").read_text()


def test_a_corrupt_image_is_skipped_and_reported(dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    victim = sorted((data / "images" / "synth_00").iterdir())[1]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "pred"
    rc = main(["predict", str(data), "--out", str(out), "--backbone", "tiny", "--no-crf"])
    assert rc == 1
    written = sorted(p.name for p in out.glob("*/*.png"))
    assert len(written) == 7 and f"{victim.stem}.png" not in written
    err = capsys.readouterr().err
    assert "1 image(s) could not be read" in err

    rc = main(["eval", "--pred", str(out), "--gt", str(data), "--out", str(tmp_path / "r")])
    assert rc == 1  # one ground-truth mask has no prediction; said, not silently skipped
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["missing_predictions"] == [
        f"synth_00/{victim.stem}.png"
    ]


def test_missing_folder_is_exit_code_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cosod", "predict", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cosod predict: error: groups folder not found: {tmp_path / 'nope'}"
    ]


def test_missing_weights_is_exit_code_2_naming_the_file(dataset, tmp_path, capsys):
    rc = main(
        [
            "predict",
            str(dataset),
            "--out",
            str(tmp_path / "o"),
            "--backbone",
            "vit_small_patch8_224.dino",
            "--weights-dir",
            str(tmp_path / "w"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert str(tmp_path / "w" / "vit_small_patch8_224.dino.safetensors") in err[0]
    assert "cosod weights fetch vit_small_patch8_224.dino" in err[0]


def test_weights_list_and_fetch_if_missing(tmp_path, capsys):
    assert main(["weights", "list", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and f"missing: {tmp_path / 'vit_base_patch8_224.dino.safetensors'}" in out
    (tmp_path / "vit_base_patch8_224.dino.pth").write_bytes(b"x")
    assert (
        main(["weights", "fetch", "vit_base_patch8_224.dino", "--if-missing", "--weights-dir", str(tmp_path)])
        == 0
    )
    assert "already present" in capsys.readouterr().out
    assert main(["weights", "fetch", "no-such-net"]) == 2


def test_weights_fetch_refuses_a_download_with_another_sha256(tmp_path, capsys, monkeypatch):
    from cosod import backbones, cli
    from cosod.backbones import get_spec

    hub = tmp_path / "model.safetensors"
    hub.write_bytes(b"truncated")
    monkeypatch.setattr(backbones, "_download_hub_file", lambda spec: hub)
    monkeypatch.setattr(cli, "_hub_reachable", lambda: True)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "10")  # restored after the test (the command sets defaults)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    name = "vit_small_patch8_224.dino"
    assert main(["weights", "fetch", name, "--weights-dir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cosod weights: cannot fetch {name} (weights file {hub}")
    assert get_spec(name).sha256 in err[0] and f"`cosod weights fetch {name}` again" in err[0]
    assert not (tmp_path / "w" / "vit_small_patch8_224.dino.safetensors").exists()
