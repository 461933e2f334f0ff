"""A real Label Studio (its own venv, ``LS_BIN``) and the backend under gunicorn, both on 127.0.0.1.

Recipe: docs/label_studio_protocol.md §5. Label Studio's first start on a fresh data dir runs its migrations
(~25 s); the migrated dir is kept in pytest's cache (``.pytest_cache/d/ls-data-<version>``) and copied for
each run, which brings start-up to ~3 s. Delete that folder to start from scratch.
"""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
USER, PASSWORD = "admin@example.com", "adminpass123"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # becomes the admin's legacy API token


def ls_bin() -> Path | None:
    """``LS_BIN`` (set by the Makefile), else the repo's ``.venv-ls`` made by ``make ls-venv``."""
    env = os.environ.get("LS_BIN")
    path = Path(env) if env else REPO / ".venv-ls" / "bin" / "label-studio"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, proc: subprocess.Popen, log: Path, timeout: float, ok: tuple[int, ...] = (200,)
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered:\n{tail}")
        try:
            if requests.get(url, timeout=2).status_code in ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; log: {log}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def ls_env(data_dir: Path, files_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": USER,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        }
    )
    return env


def start_ls(binary: Path, data_dir: Path, files_root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [str(binary), "start", "--internal-host", "127.0.0.1", "--port", str(port), "--no-browser"]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd,
            env=ls_env(data_dir, files_root),
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=data_dir,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, log, timeout=180)
    except BaseException:
        stop(proc)
        raise
    return proc, url


@dataclass
class Server:
    url: str
    log: Path
    proc: subprocess.Popen
    token: str = TOKEN  # the Label Studio admin's legacy API token


@pytest.fixture(scope="session")
def label_studio(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    binary = ls_bin()
    if binary is None:
        pytest.skip(
            "Label Studio is not installed: run `make ls-venv` (or set LS_BIN to its label-studio "
            "executable) to run the end-to-end tests"
        )
    ls_python = binary.parent / "python"
    version = (
        subprocess.run(
            [str(ls_python), "-c", "import importlib.metadata as m;print(m.version('label-studio'))"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        or "unknown"
    )
    base = tmp_path_factory.mktemp("ls")
    files_root = base / "files"
    files_root.mkdir()
    template = Path(request.config.cache.mkdir(f"ls-data-{version}"))
    if not (template / ".migrated").exists():  # first run: migrate once, keep the data dir as a template
        shutil.rmtree(template, ignore_errors=True)
        template.mkdir(parents=True)
        proc, _ = start_ls(binary, template, files_root, base / "ls-migrate.log")
        stop(proc)
        (template / ".migrated").write_text(version)
    data_dir = base / "ls-data"
    shutil.copytree(template, data_dir)
    log = base / "ls.log"
    proc, url = start_ls(binary, data_dir, files_root, log)
    try:
        yield Server(url, log, proc)
    finally:
        stop(proc)


@contextmanager
def run_backend(ls_url: str, api_key: str, base: Path, **extra_env: str) -> Iterator[Server]:
    """gunicorn serving ``backend.app:create_app()`` with the tiny backbone, one worker, four threads;
    yields once /health answers 200 (backbone loaded)."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "COSOD_", "BASIC_AUTH_"))
    }
    env.pop("REDIS_URL", None)
    env.update(
        {
            "LABEL_STUDIO_URL": ls_url,
            "LABEL_STUDIO_API_KEY": api_key,
            "COSOD_BACKBONE": "tiny",
            "MODEL_DIR": str(base / "model"),
            "XDG_CACHE_HOME": str(base / "cache"),
            "LOG_LEVEL": "INFO",
            **extra_env,
        }
    )
    log = base / "backend.log"
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--threads",
        "4",
        "--timeout",
        "0",
        "--chdir",
        str(REPO),
        "backend.app:create_app()",
    ]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    auth = (
        (extra_env["BASIC_AUTH_USER"], extra_env["BASIC_AUTH_PASS"])
        if "BASIC_AUTH_USER" in extra_env
        else None
    )
    try:
        deadline = time.monotonic() + 180
        while True:  # wait_http without auth would see 401 forever
            if proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
                )
            try:
                if requests.get(f"{url}/health", auth=auth, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the backend did not become ready within 180 s; log: {log}")
            time.sleep(0.3)
        yield Server(url, log, proc)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def backend(label_studio: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The backend connected with the admin's legacy token."""
    with run_backend(label_studio.url, TOKEN, tmp_path_factory.mktemp("backend")) as server:
        yield server


@pytest.fixture(scope="session")
def start_backend() -> Any:
    """:func:`run_backend`, for tests that need a backend with their own token or settings."""
    return run_backend
