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


@dataclass
class LSTemplate:
    binary: Path
    template: Path  # a migrated Label Studio data dir, copied for each server
    version: str


@pytest.fixture(scope="session")
def ls_template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LSTemplate:
    """The Label Studio executable and a migrated data dir (made once, kept in pytest's cache)."""
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
    template = Path(request.config.cache.mkdir(f"ls-data-{version}"))
    if not (template / ".migrated").exists():  # first run: migrate once, keep the data dir as a template
        base = tmp_path_factory.mktemp("ls-migrate")
        shutil.rmtree(template, ignore_errors=True)
        template.mkdir(parents=True)
        proc, _ = start_ls(binary, template, base, base / "ls-migrate.log")
        stop(proc)
        (template / ".migrated").write_text(version)
    return LSTemplate(binary, template, version)


@contextmanager
def run_label_studio(tpl: LSTemplate, base: Path) -> Iterator[Server]:
    """A Label Studio of its own on a copy of the migrated data dir (``base/ls-data``); stopped on exit."""
    base.mkdir(parents=True, exist_ok=True)
    files_root = base / "files"
    files_root.mkdir(exist_ok=True)
    data_dir = base / "ls-data"
    if not data_dir.exists():
        shutil.copytree(tpl.template, data_dir)
    log = base / "ls.log"
    proc, url = start_ls(tpl.binary, data_dir, files_root, log)
    try:
        yield Server(url, log, proc)
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def label_studio(ls_template: LSTemplate, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_label_studio(ls_template, tmp_path_factory.mktemp("ls")) as server:
        yield server


@contextmanager
def run_backend(
    ls_url: str,
    api_key: str,
    base: Path,
    *,
    loaded_only: bool = False,
    app: str = "backend.api.app:create_app()",
    **extra_env: str,
) -> Iterator[Server]:
    """gunicorn serving ``app`` (default ``backend.api.app:create_app()``) with the tiny backbone, one
    worker, four threads; yields once /health answers 200 (backbone loaded), or with ``loaded_only`` once it
    reports the pipeline loaded whatever its status (with Redis down it answers 503 DEGRADED for good)."""
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
        app,
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
                resp = requests.get(f"{url}/health", auth=auth, timeout=5)
                if resp.status_code == 200 or (
                    loaded_only and resp.status_code == 503 and (resp.json() or {}).get("pipeline_version")
                ):
                    break
            except (requests.RequestException, ValueError):
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


@contextmanager
def run_worker(
    base: Path, env: dict[str, str], *, slow_s: float = 0.0, name: str = "worker"
) -> Iterator[Any]:
    """A ``cosod-worker`` subprocess (tiny backbone) with ``env``; ``slow_s`` > 0 sleeps that long in each
    ``predict_group`` call (to kill or stop things in the middle of a job). Yields the Popen."""
    base.mkdir(parents=True, exist_ok=True)
    full = {
        k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "COSOD_", "BASIC_AUTH_"))
    }
    full.update({"COSOD_BACKBONE": "tiny", "LOG_LEVEL": "INFO", "COSOD_WORKER_HEARTBEAT": "1", **env})
    code = (
        "import sys, time\n"
        "import backend.jobs.worker as w\n"
        "from backend.prediction.pipelines import build_pipeline\n"
        f"DELAY = {slow_s!r}\n"
        "class Slow:\n"
        "    def __init__(self, inner): self.inner = inner\n"
        "    def __getattr__(self, name): return getattr(self.inner, name)\n"
        "    def predict_group(self, images):\n"
        "        time.sleep(DELAY)\n"
        "        return self.inner.predict_group(images)\n"
        "factory = (lambda s: Slow(build_pipeline(s))) if DELAY > 0 else None\n"
        "sys.exit(w.main(sys.argv[1:], pipeline_factory=factory))\n"
    )
    log = base / f"{name}.log"
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=full,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proc.log = log  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def start_worker() -> Any:
    """:func:`run_worker`."""
    return run_worker


@pytest.fixture(scope="session")
def start_label_studio(ls_template: LSTemplate) -> Any:
    """``start_label_studio(base)``: a context manager running a Label Studio of the test's own."""
    return lambda base: run_label_studio(ls_template, base)


def ls_api(ls: Server, method: str, path: str, **kw: Any) -> Any:
    """One Label Studio API call with the admin's legacy token; fails the test on an HTTP error."""
    headers = {"Authorization": f"Token {ls.token}"}
    resp = requests.request(method, f"{ls.url}{path}", headers=headers, timeout=120, **kw)
    assert resp.status_code < 400, f"{method} {path} -> {resp.status_code}: {resp.text[:500]}"
    return resp.json() if resp.content else None


def connect_backend(ls: Server, project: int, url: str, **fields: Any) -> dict[str, Any]:
    """Connect the ML backend at ``url`` to ``project`` as a user does in its settings (Label Studio then
    calls /health and /setup); ``fields``: more of the connection's fields (title "cosod" unless given).
    Fails the test unless Label Studio says it is connected. Returns the connection."""
    ml = ls_api(ls, "POST", "/api/ml", json={"url": url, "project": project, "title": "cosod", **fields})
    assert ml["state"] == "CO", ml
    return dict(ml)


def group_png(group: int, k: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A noisy background with the group's common object (a coloured square) at a seeded place."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7919 * group + k)
    w, h = size
    img = (rng.random((h, w, 3)) * 80 + 90).astype(np.uint8)
    r = min(w, h) // 4
    cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
    colour = [(220, 20, 30), (20, 40, 220), (30, 200, 40), (220, 200, 20)][group % 4]
    img[cy - r : cy + r, cx - r : cx + r] = colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def create_grouped_project(
    ls: Server, groups: dict[str, int], *, title: str = "cosod jobs", size: tuple[int, int] = (64, 48)
) -> tuple[int, dict[int, str]]:
    """A project with the grouped brush config and ``groups`` (name -> image count) of uploaded PNGs, each
    task carrying its ``group`` field. Returns the project id and task id -> group name."""
    config = (REPO / "label_config" / "brush_grouped.xml").read_text()
    project = ls_api(ls, "POST", "/api/projects", json={"title": title, "label_config": config})["id"]
    files, names = {}, {}
    for g, (name, n) in enumerate(groups.items()):
        for k in range(n):
            fname = f"{name}_{k}.png"
            files[f"f{len(files)}"] = (fname, group_png(g, k, size), "image/png")
            names[fname] = name
    items = list(files.items())
    for start in range(0, len(items), 50):  # Django refuses more than 100 files in one request
        part = dict(items[start : start + 50])
        imported = ls_api(ls, "POST", f"/api/projects/{project}/import", files=part)
        assert imported["task_count"] == len(part), imported
    tasks = ls_api(ls, "GET", f"/api/tasks?project={project}&page_size=1000")["tasks"]
    task_group = {}
    for t in tasks:
        fname = next(f for f in names if t["data"]["image"].endswith("-" + f))
        ls_api(ls, "PATCH", f"/api/tasks/{t['id']}", json={"data": {**t["data"], "group": names[fname]}})
        task_group[t["id"]] = names[fname]
    return project, task_group


def retrieve_predictions(ls: Server, project: int) -> Any:
    """Data Manager's "Retrieve predictions" on every task of ``project`` (Label Studio calls /predict)."""
    return ls_api(
        ls,
        "POST",
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )


def predictions_by_task(ls: Server, project: int) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for p in ls_api(ls, "GET", f"/api/predictions?project={project}"):
        out.setdefault(p["task"], []).append(p)
    return out


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """``redis://127.0.0.1:6379/13``, flushed before and after the session's use."""
    from redis_db import flushed, url

    with flushed(13):
        yield url(13)


@pytest.fixture(scope="session")
def e2e() -> Any:
    """The helpers above, for test modules (importing from ``conftest`` is ambiguous with two of them)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        TOKEN=TOKEN,
        USER=USER,
        PASSWORD=PASSWORD,
        ls_api=ls_api,
        connect_backend=connect_backend,
        create_grouped_project=create_grouped_project,
        group_png=group_png,
        predictions_by_task=predictions_by_task,
        retrieve_predictions=retrieve_predictions,
        stop=stop,
        free_port=free_port,
    )
