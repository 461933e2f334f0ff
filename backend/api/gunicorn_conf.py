"""gunicorn settings of the API: Prometheus multiprocess bookkeeping, so ``/metrics`` sums every worker.

Use it with ``gunicorn -c python:backend.api.gunicorn_conf ... 'backend.api.app:create_app()'`` (the
Makefile's ``run`` and the Dockerfile do); bind, workers, threads and timeout stay on the command line.

- ``PROMETHEUS_MULTIPROC_DIR``: when unset, this file creates a fresh temporary directory, sets the
  variable before any worker is forked (so each worker's ``prometheus_client`` starts in multiprocess mode)
  and removes the directory when the server exits. When set, the directory is created if missing and the
  ``*.db`` files in it are deleted at start (stale values of an earlier run would be added to this one's);
  nothing else there is touched.
- ``on_starting`` also refuses to serve without authentication on a non-loopback address: with no
  ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` the bind must be 127.0.0.1, ::1 or localhost (``make run``'s
  default), unless ``COSOD_ALLOW_NO_AUTH=1`` says that something in front of it authenticates. Anyone who
  reaches an open port could store, delete and block corrections and cancel jobs.
- ``child_exit``: a dead worker's live-gauge files are removed (``multiprocess.mark_process_dead``), so
  ``cosod_backbone_ready`` (mode ``livemin``) only counts live workers. Counters and histograms of dead
  workers stay: totals survive worker restarts.

Only names that are gunicorn settings or hooks are public here: gunicorn reads this module's globals.
"""

from __future__ import annotations

import glob as _glob
import os as _os
import shutil as _shutil
import tempfile as _tempfile
from typing import Any as _Any

_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Module level, not a hook: it must be in the environment before the workers fork. gunicorn may read this
# file again on a reload (HUP); the variable is set by then, so no second directory is made.
_created: str | None = None
if not _os.environ.get(_ENV):
    _created = _tempfile.mkdtemp(prefix="cosod-prometheus-")
    _os.environ[_ENV] = _created


def _multiproc_dir() -> str:
    return _os.environ[_ENV]


_LOOPBACK = ("127.0.0.1", "::1", "[::1]", "localhost")


def _open_binds(binds: list[str]) -> list[str]:
    """The addresses of ``binds`` (gunicorn's ``host:port`` / ``unix:path`` list) that are not loopback."""
    out = []
    for bind in binds:
        if bind.startswith(("unix:", "fd://")):
            continue
        host = bind.rsplit(":", 1)[0] if ":" in bind and not bind.endswith("]") else bind
        if host not in _LOOPBACK and not host.startswith("127."):
            out.append(bind)
    return out


def _refuse_open_port(server: _Any) -> None:
    authenticated = bool(_os.environ.get("BASIC_AUTH_USER", "").strip())
    allowed = _os.environ.get("COSOD_ALLOW_NO_AUTH", "").strip().lower() in ("1", "true", "yes")
    exposed = _open_binds(list(server.cfg.bind))
    if exposed and not authenticated and not allowed:
        message = (
            f"refusing to serve on {', '.join(exposed)} without authentication: set BASIC_AUTH_USER and "
            "BASIC_AUTH_PASS (and the same pair in Label Studio's model connection), bind to 127.0.0.1, or "
            "set COSOD_ALLOW_NO_AUTH=1 if a proxy in front authenticates"
        )
        server.log.error(message)
        raise SystemExit(message)


def on_starting(server: _Any) -> None:
    """Once, in the master before the first fork: no open port without authentication, and an empty
    multiprocess directory."""
    _refuse_open_port(server)
    path = _multiproc_dir()
    _os.makedirs(path, exist_ok=True)
    stale = _glob.glob(_os.path.join(path, "*.db"))
    for name in stale:
        _os.remove(name)
    server.log.info("Prometheus multiprocess dir %s (%d stale files removed)", path, len(stale))


def child_exit(server: _Any, worker: _Any) -> None:
    """In the master, when a worker has exited: drop its live-gauge files."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _multiproc_dir())


def on_exit(server: _Any) -> None:
    """The master is exiting: remove the directory if this file created it."""
    if _created is not None:
        _shutil.rmtree(_created, ignore_errors=True)
