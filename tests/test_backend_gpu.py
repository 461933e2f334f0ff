"""backend.jobs.gpu: replicas of one worker service each claim their own GPU through Redis (database 12,
flushed). No GPU is needed: the GPU ids come from CUDA_VISIBLE_DEVICES, and the workers' pipeline is the
tiny one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_db import flushed, url

from backend.errors import GPUClaimError
from backend.jobs.gpu import SLOT_KEY, claim_gpu, visible_gpus

REPO = Path(__file__).resolve().parents[1]
URL = url(12)


@pytest.fixture
def conn() -> Iterator[Any]:
    with flushed(12) as client:
        yield client


def test_visible_gpus_come_from_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3,"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b"}) == ["GPU-1a2b"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "", "PATH": ""}) == []  # and no nvidia-smi on the PATH


def test_without_cuda_visible_devices_the_gpus_are_nvidia_smis_uuids(tmp_path: Path) -> None:
    """``nvidia-smi`` stands in for the driver's tool here (there is no GPU on this machine)."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=uuid" ] && printf "GPU-aa11\\nGPU-bb22\\n"\n')
    smi.chmod(0o755)
    assert visible_gpus({"PATH": str(tmp_path)}) == ["GPU-aa11", "GPU-bb22"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    assert visible_gpus({"PATH": str(tmp_path)}) == []


def test_slots_go_gpu_by_gpu_then_run_out(conn: Any) -> None:
    claims = [claim_gpu(conn, f"w{i}", ["0", "1"], per_gpu=2, ttl=30) for i in range(4)]
    assert [c.gpu for c in claims] == ["0", "1", "0", "1"]
    assert claims[0].key == SLOT_KEY.format(pool="default", gpu="0", k=0)
    with pytest.raises(GPUClaimError, match=r"all 4 GPU slots of pool 'default' are taken \(2 GPUs \[0, 1\]"):
        claim_gpu(conn, "w4", ["0", "1"], per_gpu=2, ttl=30)
    assert claim_gpu(conn, "other-host", ["0"], pool="host-b").gpu == "0"  # another machine's pool
    claims[1].release()
    assert claim_gpu(conn, "w5", ["0", "1"], per_gpu=2).gpu == "1"
    with pytest.raises(GPUClaimError, match="found no GPU"):
        claim_gpu(conn, "w6", [])


def test_a_dead_workers_slot_frees_after_its_ttl_and_renewals_keep_it(conn: Any) -> None:
    dead = claim_gpu(conn, "dead", ["0"], ttl=1)
    alive = claim_gpu(conn, "alive", ["1"], ttl=1)
    alive.keep(0.3)
    t0 = time.monotonic()
    taken = claim_gpu(conn, "replacement", ["0", "1"], ttl=30, wait=5)  # waits for the dead one's slot
    assert taken.gpu == "0" and 0.5 < time.monotonic() - t0 < 3
    assert not dead.renew()  # it expired and was taken: the old owner learns so
    assert conn.get(alive.key) == b"alive"
    alive.release()
    dead.release()  # not its slot any more: left alone
    assert conn.get(alive.key) is None and conn.get(taken.key) == b"replacement"


def _worker(tmp_path: Path, name: str, env: dict[str, str], load_seconds: float = 0.0) -> subprocess.Popen:
    """A cosod-worker whose pipeline factory records the CUDA_VISIBLE_DEVICES it was loaded under, then takes
    at least ``load_seconds`` to load."""
    code = (
        "import os, sys, time\n"
        "import backend.jobs.worker as w\n"
        "from backend.prediction.pipelines import build_pipeline\n"
        "def factory(s):\n"
        f"    open({str(tmp_path / name)!r}, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))\n"
        f"    time.sleep({load_seconds})\n"
        "    return build_pipeline(s.with_(device='cpu', worker_gpu=None))\n"
        "sys.exit(w.main(sys.argv[1:], pipeline_factory=factory))\n"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith(("COSOD_", "LABEL_STUDIO_"))}
    full.update(
        {
            "REDIS_URL": URL,
            "COSOD_QUEUE": "cosod-gpu-test",
            "COSOD_BACKBONE": "tiny",
            "COSOD_DEVICE": "cuda",
            "COSOD_WORKER_GPU": "auto",
            "COSOD_WORKER_HEARTBEAT": "1",
            "CUDA_VISIBLE_DEVICES": "4,5",
            "MODEL_DIR": str(tmp_path / "model"),
            **env,
        }
    )
    log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--name", name], env=full, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return proc


@pytest.mark.slow
def test_replicas_of_one_worker_service_each_get_a_gpu(conn: Any, tmp_path: Path) -> None:
    procs = [_worker(tmp_path, f"w{i}", {}) for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"w{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
            assert all(p.poll() is None for p in procs), [
                (tmp_path / f"w{i}.log").read_text() for i in range(2)
            ]
            time.sleep(0.2)
        assert sorted((tmp_path / f"w{i}").read_text() for i in range(2)) == ["4", "5"]
        third = subprocess.run(  # no slot left: a clear one-line error after waiting for a dead one's slot
            [sys.executable, "-m", "backend.jobs.worker"],
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("COSOD_")},
                "REDIS_URL": URL,
                "COSOD_DEVICE": "cuda",
                "COSOD_WORKER_GPU": "auto",
                "COSOD_WORKER_HEARTBEAT": "1",
                "CUDA_VISIBLE_DEVICES": "4,5",
            },
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert third.returncode == 2 and "all 2 GPU slots of pool 'default' are taken" in third.stderr
        assert len(third.stderr.strip().splitlines()) == 1
        from rq import Worker

        while sorted(w.name for w in Worker.all(connection=conn)) != ["w0", "w1"]:  # serving the queue
            assert time.monotonic() < deadline, [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
            time.sleep(0.2)
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)
    assert conn.keys("cosod:gpu:*") == []  # released on a clean stop


def test_auto_needs_cuda() -> None:
    from backend.settings import Settings

    with pytest.raises(ValueError, match="COSOD_WORKER_GPU=auto needs COSOD_DEVICE=cuda"):
        Settings.from_env({"COSOD_WORKER_GPU": "auto"})
    with pytest.raises(ValueError, match="'auto' or unset, got 'first'"):
        Settings.from_env({"COSOD_WORKER_GPU": "first", "COSOD_DEVICE": "cuda"})
    s = Settings.from_env({"COSOD_WORKER_GPU": "AUTO", "COSOD_DEVICE": "cuda", "COSOD_WORKERS_PER_GPU": "2"})
    assert (s.worker_gpu, s.workers_per_gpu, s.gpu_pool) == ("auto", 2, "default")


@pytest.mark.slow
def test_a_worker_stopped_while_it_loads_releases_its_gpu(conn: Any, tmp_path: Path) -> None:
    """SIGTERM before RQ's own handlers are installed (the pipeline still loading) unwinds and frees the slot
    at once; the default handler would end the process and leave the slot taken for its TTL."""
    proc = _worker(tmp_path, "slow", {"COSOD_WORKER_HEARTBEAT": "30"}, load_seconds=60)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "slow").exists():
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "slow.log").read_text()
            time.sleep(0.1)
        assert conn.keys("cosod:gpu:*") == [b"cosod:gpu:default:4:0"]
        proc.terminate()
        assert proc.wait(20) == 128 + 15
    finally:
        if proc.poll() is None:
            proc.kill()
    assert conn.keys("cosod:gpu:*") == []
