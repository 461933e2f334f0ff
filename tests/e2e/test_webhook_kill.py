"""The API SIGKILLed during a burst of webhooks: every correction it acknowledged is in the store.

A real gunicorn backend (the e2e conftest's ``run_backend``; no Label Studio needed for webhooks); 300
ANNOTATION_CREATED events from 6 threads while its worker process is SIGKILLed three times (the gunicorn
master starts a new one each time). An event that got a 2xx was acknowledged and must be stored; the
others (connection reset while the worker died) are what Label Studio would see fail.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from test_backend_learning import CONFIG, annotation_event

from backend.learning.store import Store
from tests.e2e.conftest import run_backend

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROJECT = 7
EVENTS = 300


def worker_pids(master: int) -> list[int]:
    """The gunicorn master's children (its workers), from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                pids.append(int(entry.name))
    return pids


def test_acknowledged_corrections_survive_three_kills_of_the_api(tmp_path: Path) -> None:
    with run_backend(
        "http://127.0.0.1:9", "unused-token", tmp_path / "api", COSOD_TRAIN_EVERY="100000"
    ) as api:
        r = requests.post(
            f"{api.url}/setup", json={"project": f"{PROJECT}.1795340308", "schema": CONFIG}, timeout=30
        )
        assert r.status_code == 200, r.text
        rng = np.random.default_rng(0)
        events = [annotation_event(PROJECT, 1000 + k, 5000 + k, rng) for k in range(EVENTS)]
        acked: list[int] = []
        lock = threading.Lock()

        def send(event: dict[str, Any]) -> None:
            for _ in range(50):  # a dead worker refuses connections until the master replaces it
                try:
                    resp = requests.post(f"{api.url}/webhook", json=event, timeout=30)
                except requests.RequestException:
                    time.sleep(0.05)
                    continue
                if resp.ok:
                    with lock:
                        acked.append(event["annotation"]["id"])
                return

        killed = 0

        def killer() -> None:
            nonlocal killed
            for _ in range(3):
                time.sleep(1.0)
                for pid in worker_pids(api.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1

        chaos = threading.Thread(target=killer)
        chaos.start()
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(send, events))
        chaos.join()
        assert killed >= 3 and api.proc.poll() is None
        stored = {c.annotation_id for c in Store(tmp_path / "api" / "model").corrections(PROJECT)}
        lost = sorted(set(acked) - stored)
        print(f"{len(acked)} of {EVENTS} acknowledged, {len(stored)} stored, {killed} kills, lost {lost}")
        assert not lost and len(acked) > EVENTS // 2
