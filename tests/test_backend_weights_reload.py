"""A failed pipeline load is retried when its files change (weights put in place, a corrupt file replaced),
at most every ``recheck_every`` seconds and only on a request; `cosod weights fetch --offline-ok` offline."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from backend.api.app import create_app
from backend.prediction.pipelines import PipelineLoader, build_pipeline, watched_files
from backend.settings import Settings
from cosod import backbones, cli
from cosod.backbones import BACKBONES, get_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_needs_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``tiny`` backbone as a real one: without its file (``tiny.pth``) the build fails."""
    monkeypatch.setitem(BACKBONES, "tiny", replace(BACKBONES["tiny"], random_init=False))


def write_tiny_weights(path: Path) -> None:
    """A valid ``tiny`` state dict (random values of its architecture), written as a user would drop it in."""
    spec = get_spec("tiny")
    torch.manual_seed(3)
    model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **dict(spec.model_kwargs))
    tmp = path.with_name("partial.tmp")  # written aside, then moved in: the loader never sees half a file
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)


def settle(loader: PipelineLoader, timeout: float = 60.0) -> str:
    """Wait for the current load to end, without asking for a retry; its state."""
    slot = loader._slots[loader.settings.model_name]
    slot.done.wait(timeout)
    return slot.state


def make_loader(tmp_path: Path, factory: Any = None, recheck_every: float = 0.2) -> PipelineLoader:
    settings = Settings(backbone="tiny", weights_dir=str(tmp_path / "w"), model_dir=str(tmp_path / "m"))
    loader = PipelineLoader(settings, factory, recheck_every=recheck_every)
    loader.ensure_started()
    return loader


def test_a_missing_weights_file_is_loaded_once_it_is_put_in_place(tmp_path, tiny_needs_a_file) -> None:
    gate = threading.Event()
    gate.set()

    def gated(settings: Settings) -> Any:  # lets the test see the retried load while it runs
        assert gate.wait(30)
        return build_pipeline(settings)

    loader = make_loader(tmp_path, gated)
    assert settle(loader) == "failed" and loader.attempt == 1
    expected = tmp_path / "w" / "tiny.pth"
    assert f"expected the file {expected}" in (loader.error or "")
    fix = loader.fix() or ""
    assert f"put the weights file at {expected}" in fix and "without a restart" in fix
    # nothing changed: requests look again, but never load again
    for _ in range(3):
        time.sleep(0.25)
        assert loader.state == "failed"
    assert loader.attempt == 1
    # the file appears: the next look (after recheck_every) starts a new load
    (tmp_path / "w").mkdir()
    write_tiny_weights(expected)
    gate.clear()
    time.sleep(0.25)
    assert loader.state == "loading" and loader.attempt == 2 and loader.fix() is None
    gate.set()
    assert loader.wait(60) and loader.state == "ready" and loader.error is None
    assert loader.pipeline.backbone.weights_file == str(expected)
    assert loader.require() is loader.pipeline


def test_no_look_at_the_files_before_recheck_every(tmp_path, tiny_needs_a_file) -> None:
    loader = make_loader(tmp_path, recheck_every=3600.0)
    assert settle(loader) == "failed"
    (tmp_path / "w").mkdir()
    write_tiny_weights(tmp_path / "w" / "tiny.pth")
    for _ in range(5):
        assert loader.state == "failed" and loader.ready() is None
    assert loader.attempt == 1
    loader.recheck_every = 0.0
    assert loader.state == "loading" and loader.wait(60) and loader.attempt == 2


def test_a_corrupt_file_is_not_read_again_until_it_changes(tmp_path, tiny_needs_a_file) -> None:
    calls = []

    def counting(settings: Settings) -> Any:
        calls.append(time.monotonic())
        return build_pipeline(settings)

    (tmp_path / "w").mkdir()
    path = tmp_path / "w" / "tiny.pth"
    path.write_bytes(b"\x00not a state dict")
    loader = make_loader(tmp_path, counting)
    assert settle(loader) == "failed"
    assert "WeightsInvalidError: cannot read weights file" in (loader.error or "")
    assert "replace the file" in (loader.fix() or "")
    before = watched_files(loader.settings)
    for _ in range(4):  # one look per 0.2 s at most: the file is the same, so no new load
        time.sleep(0.25)
        assert loader.state == "failed"
    assert len(calls) == 1 and loader.attempt == 1
    # a sidecar the load may write and a hidden temp file of a copy in progress change nothing
    (tmp_path / "w" / "tiny.pth.sha256").write_text("{}")
    (tmp_path / "w" / ".tiny.pth.123.tmp").write_bytes(b"half")
    assert watched_files(loader.settings) == before
    time.sleep(0.25)
    assert loader.state == "failed" and len(calls) == 1
    write_tiny_weights(path)
    time.sleep(0.25)
    assert loader.wait(60) and loader.state == "ready"
    assert len(calls) == 2 and loader.attempt == 2


def test_a_failure_the_files_do_not_explain_says_restart(tmp_path) -> None:
    def broken(settings: Settings) -> Any:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    loader = make_loader(tmp_path, broken)
    assert settle(loader) == "failed"
    time.sleep(0.25)
    assert loader.state == "failed" and loader.attempt == 1
    assert "restart the backend" in (loader.fix() or "")


def test_health_goes_from_failed_to_ready_once_the_file_is_there(tmp_path, tiny_needs_a_file) -> None:
    settings = Settings(
        backbone="tiny",
        weights_dir=str(tmp_path / "w"),
        model_dir=str(tmp_path / "m"),
        local_files_root=str(tmp_path / "files"),  # images from disk: no Label Studio needed
    )
    app = create_app(settings)
    loader = app.extensions["cosod"]["loader"]
    loader.recheck_every = 0.1
    metrics = app.extensions["cosod"]["metrics"]
    assert settle(loader) == "failed"
    client = app.test_client()
    r = client.get("/health")
    assert r.status_code == 503 and r.json["status"] == "ERROR" and r.json["load_attempt"] == 1
    # the folder is private (COSOD_WEIGHTS_DIR): /health names the file below it
    assert "$COSOD_WEIGHTS_DIR/tiny.pth" in r.json["error"]
    assert "$COSOD_WEIGHTS_DIR/tiny.pth" in r.json["fix"] and "without a restart" in r.json["fix"]
    assert metrics.backbone_ready._value.get() == 0.0
    (tmp_path / "w").mkdir()
    write_tiny_weights(tmp_path / "w" / "tiny.pth")
    time.sleep(0.15)
    states = [client.get("/health").json["status"]]
    deadline = time.monotonic() + 60
    while states[-1] != "UP" and time.monotonic() < deadline:
        time.sleep(0.1)
        states.append(client.get("/health").json["status"])
    assert states[0] == "LOADING" and states[-1] == "UP", states
    r = client.get("/health")
    assert r.status_code == 200 and r.json["load_attempt"] == 2 and "fix" not in r.json
    assert metrics.backbone_ready._value.get() == 1.0  # set when the retried load ended


# -- cosod weights fetch --offline-ok ------------------------------------------------------------------
def test_fetch_offline_ok_prints_one_notice_and_exits_0(tmp_path) -> None:
    """A real run without the network: the hub's endpoint refuses connections (HF_ENDPOINT on a closed
    local port), the Hugging Face cache is empty."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_ETAG_TIMEOUT": "3",
        "HF_HUB_DOWNLOAD_TIMEOUT": "3",
    }
    env.pop("HF_HUB_OFFLINE", None)
    name = "vit_small_patch8_224.dino"
    cmd = [sys.executable, "-m", "cosod", "weights", "fetch", name, "--weights-dir", str(tmp_path / "w")]
    flagged = subprocess.run(
        [*cmd, "--if-missing", "--offline-ok"], env=env, capture_output=True, text=True, timeout=180
    )
    assert flagged.returncode == 0, flagged.stderr
    lines = (flagged.stdout + flagged.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cosod weights: {name} not fetched: the Hugging Face hub is not reachable")
    assert str(tmp_path / "w" / f"{name}.safetensors") in lines[0]
    assert not (tmp_path / "w" / f"{name}.safetensors").exists()
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert plain.returncode == 1 and f"cosod weights: cannot fetch {name}" in plain.stderr


def test_fetch_offline_ok_still_fails_on_a_wrong_download(tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub.utils import LocalEntryNotFoundError

    monkeypatch.setattr(cli, "_hub_reachable", lambda: True)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "10")  # restored after the test (the command sets defaults)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    name = "vit_small_patch8_224.dino"
    argv = ["weights", "fetch", name, "--weights-dir", str(tmp_path / "w"), "--offline-ok"]

    def lost(spec: Any) -> Path:  # the hub answered the TCP probe, then the download broke off
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(backbones, "_download_hub_file", lost)
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.count("\n") == 1 and "not fetched" in out.out

    hub = tmp_path / "model.safetensors"
    hub.write_bytes(b"truncated")
    monkeypatch.setattr(backbones, "_download_hub_file", lambda spec: hub)
    assert cli.main(argv) == 1  # not a network problem: an error, whatever the flag
    err = capsys.readouterr().err
    assert f"cannot fetch {name} (weights file {hub}" in err


def test_make_run_fetches_with_offline_ok_and_does_not_ignore_errors() -> None:
    recipe = (ROOT / "Makefile").read_text().split("\nrun: install\n", 1)[1].split("\n\n", 1)[0]
    fetch = [line.strip() for line in recipe.splitlines() if "weights fetch" in line]
    assert fetch == ["$(BIN)/cosod weights fetch $(COSOD_BACKBONE) --if-missing --offline-ok"]
