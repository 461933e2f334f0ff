"""A private ``redis-server`` for fault tests: on its own port and folder, killable and restartable, with or
without AOF persistence. Tests that kill Redis use this one, never the shared 127.0.0.1:6379."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` with its data in ``folder``; ``aof``: append-only file with
    ``appendfsync always`` (what a restart keeps), else nothing is kept."""

    def __init__(self, folder: Path, aof: bool, port: int | None = None):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.exe = exe
        self.folder = folder
        self.aof = aof
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        )
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.folder),
                "--save",
                "",
                *persistence,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"redis-server on port {self.port} did not start: {(self.folder / 'redis.log').read_text()}"
        )

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        self.proc = None


REPO = Path(__file__).resolve().parents[1]


@contextmanager
def cosod_worker(
    tmp_path: Path, name: str, url: str, queue: str, **env_extra: str
) -> Iterator[subprocess.Popen]:
    """A real ``cosod-worker`` subprocess (tiny backbone, 1 s heartbeat) on ``queue`` at ``url``; its log is
    ``tmp_path/<name>.log``. Job functions of the test modules import (``tests`` is on its path). Stopped
    with SIGTERM (then SIGKILL) on exit if still running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COSOD_", "LABEL_STUDIO_"))}
    env.update(
        {
            "REDIS_URL": url,
            "COSOD_QUEUE": queue,
            "COSOD_BACKBONE": "tiny",
            "COSOD_WORKER_HEARTBEAT": "1",
            "MODEL_DIR": str(tmp_path / "model"),
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
            **env_extra,
        }
    )
    with open(tmp_path / f"{name}.log", "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend.jobs.worker", "--name", name],
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def stall_first_run(runs: int, seconds: float) -> int:
    """The body of the test jobs that get killed: report progress for ``seconds`` when ``runs`` (the run's
    number, counted by the job) is 1, so the test can kill something mid-job; later runs end at once."""
    from backend.jobs import queue as jobqueue

    deadline = time.monotonic() + (seconds if runs == 1 else 0.0)
    jobqueue.report_progress(0, 2)
    while time.monotonic() < deadline:
        jobqueue.report_progress(1, 2)
        time.sleep(0.05)
    jobqueue.report_progress(2, 2)
    return runs
