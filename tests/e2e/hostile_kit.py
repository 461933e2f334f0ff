"""The hostile-input corpus' machinery (issue 13): requests, cases, the world they run in, the judge.

A :class:`Case` names a category, a name, the requests it sends (built at run time from the :class:`World`:
real project and task ids, URLs) and what is expected of every answer. :func:`run_case` sends them to the
real backend under gunicorn and records an :class:`Outcome`: statuses, time, the peak resident memory of
the gunicorn worker processes during the case (``VmHWM`` of each, reset through ``/proc/<pid>/clear_refs``
before the case), the growth of the backend's log, and every problem found. Checked for every answer:

- no 5xx, except a 503 the case documents (a read route while a dependency is down);
- no traceback, no server path (the test's temporary tree, the repository, the venvs) and no credential
  (Label Studio's token and admin password, the Redis password, the basic-auth password, a session cookie)
  in the answer, unless the request itself carried that string;
- the answer's size, the case's time, the peak RSS growth and the log growth within the case's bounds;
- the gunicorn worker still alive (a worker killed by the kernel for memory would be replaced silently).

:func:`open_world` starts one backend configuration (``rq``: Redis; ``down``: REDIS_URL with a password
pointing at a closed port; ``auth``: basic auth on) against a real Label Studio and prepares what the cases
name: projects, tasks, genuine corrections stored through Label Studio's own webhook, a local-files root
with hostile symlinks, and a canary HTTP server (an S3 endpoint for Label Studio's presign redirects and a
target for server-side request forgery) that records every request and its headers.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parents[2]

# -- documented bounds ---------------------------------------------------------------------------------
RSS_CASE_MB = 300.0  # peak RSS growth of the gunicorn worker processes during one case
RSS_TOTAL_MB = 300.0  # RSS growth of a whole configuration: after its warm-up -> after its last case
MAX_RESPONSE_BYTES = 64 * 1024  # default bound on one answer's body
MAX_LOG_BYTES = 4 * 1024 * 1024  # default bound on what one case adds to the backend's log
CASE_SECONDS = 15.0  # default bound on one case's time (all its requests)
FAST_SECONDS = 3.0  # "fast": what Label Studio's 1 s webhook budget allows on a busy 2-core machine
WATCHDOG_MB = 2048.0  # the test kills the worker past this growth (protects the machine, fails the case)
METRICS_MAX_BYTES = 200 * 1024  # /metrics stays under this whatever the labels sent
REDIS_DB = 14  # this module's own Redis database (the e2e fixture's is 13)
REDIS_PASSWORD = "hostile-redis-pw-5c9e1f"  # noqa: S105 - a canary, never a real secret
AUTH_USER, AUTH_PASS = "hostile-user", "hostile-pass-7d41a0"
S3_SECRET = "hostile-s3-secret-0b7e"  # noqa: S105
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/', "site-packages")
UNSET: Any = object()


# -- requests and cases ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    """One HTTP request. ``json`` is serialised with NaN allowed and non-ASCII escaped (so lone surrogates
    travel as ``\\ud800``); ``body`` is sent as it is. ``stream=(declared, sent)`` sends a body of spaces
    with ``Content-Length: declared`` but only ``sent`` bytes of it (then reads the answer), or, when both
    are equal, the whole body without holding it in memory; ``json`` then goes last, after the spaces.
    ``auth``: ``"world"`` uses the configuration's credentials, ``"none"`` sends none. ``status``: what this
    request may answer (default: the case's)."""

    method: str
    path: str
    json: Any = UNSET
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    auth: str = "world"
    status: str | None = None
    stream: tuple[int, int] | None = None
    timeout: float = 180.0

    def payload(self) -> bytes | None:
        if self.json is not UNSET:
            return json.dumps(self.json, allow_nan=True).encode()
        return self.body


@dataclass
class Reply:
    status: int  # 0: no answer (connection error or timeout, see ``error``)
    body: bytes
    seconds: float
    headers: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


Check = Callable[["World", Sequence[Reply]], list[str]]
Act = Callable[["World"], list[str]]


@dataclass(frozen=True)
class Case:
    """A hostile input and its expectation. ``requests(world)`` builds what is sent; ``act(world)`` (instead
    of, or after, the requests) drives Label Studio or other processes and returns problems; ``check`` runs
    after the requests and returns problems. ``status``: ``"4xx"``, ``"2xx|4xx"``, ``"401"``... per answer.
    ``allow_503``: a 503 is documented for this read route while a dependency is down."""

    category: str
    name: str
    requests: Callable[[World], Sequence[Req]] | None = None
    status: str = "4xx"
    check: Check | None = None
    act: Act | None = None
    config: str = "rq"
    seconds: float = CASE_SECONDS
    max_bytes: int = MAX_RESPONSE_BYTES
    rss_mb: float = RSS_CASE_MB
    log_bytes: int = MAX_LOG_BYTES
    allow_503: bool = False
    heavy: bool = False  # run after the others of its configuration (slow on a backend without a bound)
    note: str = ""

    @property
    def id(self) -> str:
        return f"{self.category}:{self.name}"


@dataclass
class Outcome:
    case: Case
    statuses: list[int]
    seconds: float
    rss_mb: float  # peak RSS growth of the worker processes during the case
    rss_after_mb: float  # RSS growth still there after the case
    response_bytes: int
    log_bytes: int
    problems: list[str]

    def message(self) -> str:
        counts: dict[int, int] = {}
        for st in self.statuses:
            counts[st] = counts.get(st, 0) + 1
        shown = ", ".join(f"{st}" if n == 1 else f"{st} x{n}" for st, n in counts.items())
        return f"{self.case.id} (answers: {shown or 'none'}): " + "; ".join(self.problems)


def status_ok(status: int, spec: str) -> bool:
    for part in spec.split("|"):
        part = part.strip()
        if part.endswith("xx") and status // 100 == int(part[0]):
            return True
        if part.isdigit() and status == int(part):
            return True
    return False


# -- the canary: an HTTP server that records what reaches it ---------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class Canary:
    """A threaded HTTP server on 127.0.0.1 that answers every GET with a small PNG and every HEAD with 200,
    and records each request (method, path, headers). Label Studio's S3 storage uses it as its endpoint, so
    a presigned URL redirects to it; forged task URLs point at it too."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        png = png_bytes()
        canary = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                canary.seen.append(Seen(self.command, self.path, {k: v for k, v in self.headers.items()}))

            def do_HEAD(self) -> None:  # noqa: N802 - http.server API
                self._record()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                self._record()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def do_POST(self) -> None:  # noqa: N802
                self._record()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="canary", daemon=True)
        self.thread.start()

    def since(self, mark: int) -> list[Seen]:
        return self.seen[mark:]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def png_bytes(size: tuple[int, int] = (64, 48), value: int = 120) -> bytes:
    import numpy as np
    from PIL import Image

    w, h = size
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# -- Label Studio's brush RLE, written from runs (never materialising the decoded array) -------------------
def rle_runs(runs: Sequence[tuple[int, int]], *, count: int | None = None, word: int = 8) -> list[int]:
    """Label Studio brush RLE bytes for ``(value, length)`` runs: the header (``count`` elements, default the
    runs' total: another number makes a lying header; ``word`` bits per value), then one repeat token per
    run of at most 65536 (flag 1, class 3, 16-bit length - 1, 8-bit value), zero-padded to bytes. A
    16384x16384 RGBA mask is 2**30 elements but only ~55 kB of RLE."""
    total = sum(n for _, n in runs)
    count = total if count is None else count
    parts = [f"{count:032b}", f"{word - 1:05b}", "".join(f"{b - 1:04b}" for b in (3, 4, 8, 16))]
    for value, length in runs:
        while length > 0:
            n = min(length, 65536)
            parts.append("111" + f"{n - 1:016b}" + f"{value:08b}")
            length -= n
    bits = "".join(parts)
    bits += "0" * (8 - len(bits) % 8)
    return list(int(bits, 2).to_bytes(len(bits) // 8, "big"))


def brush(rle: Any, width: Any, height: Any, **extra: Any) -> dict[str, Any]:
    """A BrushLabels region as Label Studio sends it in an annotation's result."""
    region = {
        "id": "hx",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": rle, "brushlabels": ["Object"]},
    }
    region.update(extra)
    return region


# -- resident memory of the gunicorn workers, from /proc ---------------------------------------------------
def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the gunicorn workers and what they spawned), not ``pid`` itself."""
    children = _ppid_map()
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return sorted(out)


def workers(master: int) -> list[int]:
    """The gunicorn master's direct children: its worker processes."""
    return sorted(_ppid_map().get(master, []))


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pids: Sequence[int]) -> float:
    return sum(_status_kb(p, "VmRSS") for p in pids) / 1024.0


def kill(pids: Sequence[int]) -> None:
    import signal

    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def reset_peak(pids: Sequence[int]) -> bool:
    """Reset each process's peak RSS (``VmHWM``) to its current RSS; False when the kernel refuses."""
    ok = True
    for p in pids:
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


class PeakSampler:
    """The largest summed RSS seen every 20 ms (the measure when ``VmHWM`` cannot be reset), and the
    watchdog: past ``limit_mb`` above the start it SIGKILLs the processes, so that a backend without a bound
    cannot take the machine down (gunicorn starts a new worker; the case fails)."""

    def __init__(self, pids: Sequence[int], limit_mb: float = WATCHDOG_MB):
        self.pids, self._stop = list(pids), threading.Event()
        self.start = self.peak = rss_mb(pids)
        self.limit_mb, self.fired = limit_mb, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = rss_mb(self.pids)
            self.peak = max(self.peak, now)
            if now - self.start > self.limit_mb and not self.fired:
                self.fired = True
                kill(self.pids)

    def stop(self) -> float:
        self._stop.set()
        self.thread.join()
        return max(self.peak, rss_mb(self.pids))


# -- the world a configuration's cases run in -------------------------------------------------------------
@dataclass
class World:
    config: str
    url: str  # the backend
    master: int  # gunicorn's master pid
    log: Path
    ls: Any  # conftest.Server of Label Studio
    base: Path
    model_dir: Path
    files_root: Path
    canary: Canary
    auth: tuple[str, str] | None
    secrets: dict[str, str]
    paths: list[str]
    redis_url: str | None = None
    projects: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, list[int]] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)  # project key -> label config
    ml: dict[str, int] = field(default_factory=dict)  # project key -> Label Studio ML backend id
    s3_task: int | None = None
    genuine: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # annotation id -> stored row
    forged_range: tuple[int, int] | None = None  # annotation ids forged as deleted in project A
    start_rss: float = 0.0
    restarts: list[str] = field(default_factory=list)  # cases after which the test restarted the worker
    canary_mark: int = 0
    session: requests.Session = field(default_factory=requests.Session)
    scratch: dict[str, Any] = field(default_factory=dict)
    start_worker: Any = None  # conftest.run_worker

    # Label Studio API as the admin
    def ls_api(self, method: str, path: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Token {self.ls.token}"}
        resp = requests.request(method, f"{self.ls.url}{path}", headers=headers, timeout=120, **kw)
        if resp.status_code >= 400:
            raise RuntimeError(f"Label Studio {method} {path} -> {resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else None

    def __repr__(self) -> str:
        return f"World({self.config!r}, backend {self.url}, projects {self.projects})"

    def pid(self, key: str) -> int:
        return self.projects[key]

    def canary_since_case(self) -> list[Seen]:
        return self.canary.since(self.canary_mark)

    def stored(self, project: int, annotation_id: int) -> tuple[Any, ...] | None:
        """The stored correction row (read-only), or None."""
        return read_corrections(self.model_dir, project).get(annotation_id)


CORRECTION_COLUMNS = "annotation_id, task_id, group_key, image_url, width, height, empty, digest, mask_png"


def read_corrections(model_dir: Path, project: int) -> dict[int, tuple[Any, ...]]:
    """annotation id -> (task_id, group_key, image_url, width, height, empty, digest, sha256 of the mask
    PNG), read from the SQLite store in read-only mode."""
    path = model_dir / "cosod.sqlite3"
    if not path.exists():
        return {}
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute(
            f"SELECT {CORRECTION_COLUMNS} FROM corrections WHERE project = ?", (project,)
        ).fetchall()
    finally:
        con.close()
    return {
        int(r[0]): (*r[1:8], hashlib.sha256(r[8]).hexdigest() if r[8] is not None else None) for r in rows
    }


# -- sending -------------------------------------------------------------------------------------------
def send(world: World, req: Req) -> Reply:
    headers = dict(req.headers)
    auth = world.auth if req.auth == "world" else None
    if req.stream is not None:
        return _send_stream(world, req, headers, auth)
    data = req.payload()
    if req.json is not UNSET and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "application/json"
    t0 = time.perf_counter()
    try:
        resp = world.session.request(
            req.method, world.url + req.path, data=data, headers=headers, auth=auth, timeout=req.timeout
        )
    except requests.RequestException as exc:
        return Reply(0, b"", time.perf_counter() - t0, error=f"{exc.__class__.__name__}: {str(exc)[:200]}")
    return Reply(resp.status_code, resp.content, time.perf_counter() - t0, dict(resp.headers))


def _send_stream(world: World, req: Req, headers: dict[str, str], auth: tuple[str, str] | None) -> Reply:
    """A body of ``declared`` bytes (spaces, then ``req.json`` when given) of which ``sent`` are sent."""
    import base64

    declared, sent = req.stream or (0, 0)
    tail = req.payload() or b""
    host = urlparse(world.url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port, timeout=req.timeout)
    try:
        conn.putrequest(req.method, req.path)
        conn.putheader("Content-Length", str(declared))
        conn.putheader("Content-Type", "application/json")
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            conn.putheader("Authorization", f"Basic {token}")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        pad = max(0, min(sent, declared) - len(tail))
        chunk = b" " * (1 << 20)
        try:
            while pad > 0:
                n = min(pad, len(chunk))
                conn.send(chunk[:n])
                pad -= n
            if sent >= declared:
                conn.send(tail)
        except OSError:
            pass  # the server answered early and closed: read that answer
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, body, time.perf_counter() - t0, dict(resp.getheaders()))
    except (OSError, http.client.HTTPException) as exc:
        return Reply(0, b"", time.perf_counter() - t0, error=f"{exc.__class__.__name__}: {str(exc)[:200]}")
    finally:
        conn.close()


# -- judging -------------------------------------------------------------------------------------------
def leaks(world: World, req: Req, reply: Reply) -> list[str]:
    """Tracebacks, server paths and credentials in an answer (strings the request itself carried excepted)."""
    if not reply.body:
        return []
    texts = [reply.text]
    decoded = reply.json()
    if decoded is not None:
        texts.append(json.dumps(decoded, ensure_ascii=False))
    text = "\n".join(texts)
    sent = req.path + "\n" + (req.payload() or b"").decode("utf-8", "replace") + json.dumps(dict(req.headers))
    out = []
    for marker in TRACEBACK_MARKERS:
        if marker in text and marker not in sent:
            out.append(f"a traceback marker {marker!r} in the answer")
    for name, secret in world.secrets.items():
        if secret and secret in text and secret not in sent:
            out.append(f"the {name} in the answer")
    for path in world.paths:
        if path and path in text and path not in sent:
            out.append(f"the server path {path!r} in the answer")
    return out


def run_case(world: World, case: Case) -> Outcome:
    """Send the case's requests (or run its act), measure, and judge every answer."""
    problems: list[str] = []
    if world.master <= 0 or not Path(f"/proc/{world.master}").exists():
        return Outcome(case, [], 0.0, 0.0, 0.0, 0, 0, ["the backend is not running"])
    reqs = list(case.requests(world)) if case.requests else []
    before_workers = workers(world.master)
    pids = descendants(world.master)
    rss0 = rss_mb(pids)
    hwm = reset_peak(pids)
    sampler = PeakSampler(pids)
    log0 = world.log.stat().st_size if world.log.exists() else 0
    world.canary_mark = len(world.canary.seen)
    t0 = time.perf_counter()
    replies = [send(world, r) for r in reqs]
    if case.act is not None:
        problems += case.act(world)
    elapsed = time.perf_counter() - t0
    peak = sampler.stop()
    if hwm and not sampler.fired:
        peak = max(peak, sum(_status_kb(p, "VmHWM") for p in pids) / 1024.0)
    rss1 = rss_mb(pids)
    if sampler.fired:
        problems.append(f"the test killed the worker: its RSS grew past {WATCHDOG_MB:.0f} MB during the case")
    restarted = sampler.fired or any(r.status == 0 and "Timeout" in (r.error or "") for r in replies)
    if restarted:
        problems += recover(world)  # a runaway request must not slow or starve the next cases
        world.restarts.append(case.id)
    log1 = world.log.stat().st_size if world.log.exists() else 0
    for req, reply in zip(reqs, replies, strict=True):
        where = f"{req.method} {req.path[:60]}"
        spec = req.status or case.status
        if reply.status == 0:
            problems.append(f"{where}: no answer ({reply.error})")
            continue
        if reply.status >= 500 and not (reply.status == 503 and case.allow_503):
            problems.append(f"{where}: {reply.status} {reply.text[:160]!r}")
        elif not status_ok(reply.status, spec):
            problems.append(f"{where}: status {reply.status}, expected {spec}: {reply.text[:160]!r}")
        if len(reply.body) > case.max_bytes:
            problems.append(f"{where}: answer of {len(reply.body)} bytes > {case.max_bytes}")
        problems += [f"{where}: {p}" for p in leaks(world, req, reply)]
    if elapsed > case.seconds:
        problems.append(f"took {elapsed:.1f} s > {case.seconds:.1f} s")
    if peak - rss0 > case.rss_mb:
        problems.append(f"worker RSS grew by {peak - rss0:.0f} MB (peak) > {case.rss_mb:.0f} MB")
    if log1 - log0 > case.log_bytes:
        problems.append(f"the backend log grew by {log1 - log0} bytes > {case.log_bytes}")
    after_workers = workers(world.master)
    if before_workers and not set(before_workers) <= set(after_workers) and not restarted:
        problems.append(f"a gunicorn worker died during the case ({before_workers} -> {after_workers})")
    if case.check is not None and not any(r.status == 0 for r in replies):
        try:
            problems += case.check(world, replies)
        except Exception as exc:  # a check that cannot read the answer is a failed expectation
            problems.append(f"check failed: {exc.__class__.__name__}: {exc}")
    return Outcome(
        case,
        [r.status for r in replies],
        elapsed,
        peak - rss0,
        rss1 - rss0,
        sum(len(r.body) for r in replies),
        log1 - log0,
        problems,
    )


def recover(world: World) -> list[str]:
    """Kill the gunicorn worker (and what it spawned) and wait for the master's new one to be ready."""
    kill(descendants(world.master))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = requests.get(f"{world.url}/health", auth=world.auth, timeout=5)
            if r.status_code in (200, 503) and (r.json() or {}).get("pipeline_version"):
                return ["(the worker was restarted after this case)"]
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    return ["the backend did not come back after its worker was restarted"]


def summary(outcomes: Sequence[Outcome]) -> str:
    """Cases per category, answers by class, failures, worst time and worst memory growth; then each
    failing case with its problems."""
    cats: dict[str, list[Outcome]] = {}
    for o in outcomes:
        cats.setdefault(o.case.category, []).append(o)
    head = f"{'category':<26} {'cases':>5} {'failed':>6} {'2xx':>5} {'4xx':>5} {'5xx':>5} {'none':>5} " + (
        f"{'total s':>8} {'worst s':>8} {'worst MB':>9}"
    )
    lines = [head, "-" * len(head)]

    def row(name: str, group: Sequence[Outcome]) -> str:
        statuses = [s for o in group for s in o.statuses]
        by = {k: sum(1 for s in statuses if s // 100 == k) for k in (2, 4, 5)}
        none = sum(1 for s in statuses if s == 0)
        return (
            f"{name:<26} {len(group):>5} {sum(1 for o in group if o.problems):>6} {by[2]:>5} {by[4]:>5} "
            f"{by[5]:>5} {none:>5} {sum(o.seconds for o in group):>8.1f} "
            f"{max((o.seconds for o in group), default=0):>8.2f} "
            f"{max((o.rss_mb for o in group), default=0):>9.0f}"
        )

    for name in sorted(cats, key=_cat_order):
        lines.append(row(name, cats[name]))
    lines.append("-" * len(head))
    lines.append(row("total", list(outcomes)))
    failing = [o for o in outcomes if o.problems]
    if failing:
        lines += ["", f"{len(failing)} failing case(s):"]
        lines += [f"  [{o.case.config}] {o.message()[:400]}" for o in failing]
    return "\n".join(lines)


def table(outcomes: Sequence[Outcome]) -> str:
    """One tab-separated line per case: config, id, statuses, seconds, MB, bytes, log bytes, problems."""
    lines = ["config\tcase\tstatuses\tseconds\tpeak_rss_mb\tanswer_bytes\tlog_bytes\tproblems"]
    for o in outcomes:
        statuses = ",".join(str(s) for s in o.statuses[:20]) + (",..." if len(o.statuses) > 20 else "")
        problems = " | ".join(o.problems).replace("\t", " ").replace("\n", " ")[:2000]
        lines.append(
            f"{o.case.config}\t{o.case.id}\t{statuses}\t{o.seconds:.3f}\t{o.rss_mb:.0f}\t"
            f"{o.response_bytes}\t{o.log_bytes}\t{problems}"
        )
    return "\n".join(lines) + "\n"


def _cat_order(name: str) -> tuple[int, str]:
    m = re.match(r"(\d+)", name)
    return (int(m.group(1)) if m else 99, name)


# -- opening a configuration ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _closed_port() -> int:
    """A port nothing listens on (bound and released; nothing else here binds it in the meantime)."""
    return free_port()


def make_files(root: Path, outside: Path) -> None:
    """The local-files root: two images, and symlinks that lead outside it."""
    from tests.e2e.conftest import group_png

    (root / "imgs").mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    (root / "imgs" / "a.png").write_bytes(group_png(0, 0))
    (root / "imgs" / "b.png").write_bytes(group_png(0, 1))
    (root / "imgs" / "not-an-image.png").write_bytes(b"this is not a PNG\n" * 10)
    (outside / "secret.png").write_bytes(group_png(1, 0))
    links = {
        "link-out.png": outside / "secret.png",
        "link-passwd": Path("/etc/passwd"),
        "link-dir": outside,
        "link-loop": root / "imgs" / "link-loop",
    }
    for name, target in links.items():
        link = root / "imgs" / name
        if not link.is_symlink():
            link.symlink_to(target)
    sibling = root.parent / (root.name + "X")  # a sibling whose name starts with the root's
    sibling.mkdir(exist_ok=True)
    (sibling / "a.png").write_bytes(group_png(1, 1))


def brush_config(n_labels: int = 1, n_controls: int = 1) -> str:
    labels = "".join(f'<Label value="L{k}"/>' for k in range(n_labels))
    controls = "".join(
        f'<BrushLabels name="tag{k if k else ""}" toName="image">{labels}</BrushLabels>'
        for k in range(n_controls)
    )
    return f'<View><Image name="image" value="$image"/>{controls}</View>'


@contextmanager
def open_world(
    config: str,
    ls: Any,
    base: Path,
    *,
    run_worker: Any = None,
    basetemp: Path | None = None,
) -> Iterator[World]:
    """Start the backend of ``config`` (``rq``, ``down`` or ``auth``) against Label Studio ``ls`` and prepare
    its projects; yields the :class:`World`. ``run_worker``: the e2e conftest's helper (the fine-tune case
    starts a worker with it)."""
    from tests.e2e.conftest import TOKEN, USER, run_backend

    base.mkdir(parents=True, exist_ok=True)
    files_root, outside = base / "files", base / "outside"
    make_files(files_root, outside)
    model_dir = base / "model"
    env: dict[str, str] = {
        "MODEL_DIR": str(model_dir),
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        "COSOD_TRAIN_EVERY": "1000",
        "COSOD_FINETUNE_STEPS": "5",
        "COSOD_QUEUE": f"cosod-hostile-{config}",
    }
    redis_url = None
    auth = None
    cleanup: Callable[[], Any] | None = None
    if config == "rq":
        import redis

        redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        client = redis.Redis.from_url(redis_url)
        client.ping()
        client.flushdb()
        cleanup = client.flushdb
    elif config == "down":
        redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{_closed_port()}/0"
        env["COSOD_TRAIN_EVERY"] = "1"  # every stored correction enqueues a fine-tune (into a dead Redis)
        env["COSOD_FINETUNE_MIN_CORRECTIONS"] = "1"
    elif config == "auth":
        auth = (AUTH_USER, AUTH_PASS)
        env.update(BASIC_AUTH_USER=AUTH_USER, BASIC_AUTH_PASS=AUTH_PASS)
    if redis_url:
        env["REDIS_URL"] = redis_url
    canary = Canary()
    paths = [str(basetemp or base), str(REPO), sys.prefix, str(Path(ls.log).parent)]
    secrets = {
        "Label Studio token": TOKEN,
        "Label Studio admin password": "adminpass123",
        "Redis password": REDIS_PASSWORD,
        "basic-auth password": AUTH_PASS,
        "S3 secret": S3_SECRET,
        "Label Studio session cookie": "sessionid=",
        "Label Studio admin e-mail": USER,
    }
    with ExitStack() as stack:
        stack.callback(canary.close)
        if cleanup is not None:
            stack.callback(cleanup)
        server = stack.enter_context(run_backend(ls.url, TOKEN, base / "backend", loaded_only=True, **env))
        world = World(
            config=config,
            url=server.url,
            master=server.proc.pid,
            log=server.log,
            ls=ls,
            base=base,
            model_dir=model_dir,
            files_root=files_root,
            canary=canary,
            auth=auth,
            secrets=secrets,
            paths=paths,
            redis_url=redis_url,
            start_worker=run_worker,
        )
        stack.callback(world.session.close)
        _prepare(world)
        world.start_rss = rss_mb(descendants(world.master))
        yield world


def _setup(world: World, key: str) -> None:
    r = world.session.post(
        f"{world.url}/setup",
        json={"project": f"{world.pid(key)}.1795340308", "schema": world.configs[key]},
        auth=world.auth,
        timeout=60,
    )
    r.raise_for_status()


def _prepare(world: World) -> None:
    from tests.e2e.conftest import create_grouped_project

    ls = world.ls
    grouped = (REPO / "label_config" / "brush_grouped.xml").read_text()
    # B: a project the backend has seen (/setup), with two images
    world.projects["B"], tb = create_grouped_project(ls, {"hxb": 2}, title=f"hostile B {world.config}")
    world.tasks["B"], world.configs["B"] = sorted(tb), grouped
    _setup(world, "B")
    if world.config != "rq":
        _remember_data(world)
        _warm(world)
        return
    # A: the project people correct (connected to the backend, so Label Studio sends its webhooks), plus
    # a cloud task whose image Label Studio presigns (a redirect to the canary, an S3 endpoint)
    world.projects["A"], ta = create_grouped_project(ls, {"hxa": 4}, title="hostile A")
    world.tasks["A"], world.configs["A"] = sorted(ta), grouped
    world.ls_api(
        "POST",
        "/api/storages/s3",
        json={
            "project": world.pid("A"),
            "bucket": "canary",
            "s3_endpoint": world.canary.url,
            "aws_access_key_id": "AKIAHOSTILE",
            "aws_secret_access_key": S3_SECRET,
            "region_name": "us-east-1",
            "presign": True,
            "use_blob_urls": True,
        },
    )
    world.ls_api(
        "POST",
        f"/api/projects/{world.pid('A')}/import",
        json=[{"image": "s3://canary/a.png", "group": "cloud"}],
    )
    listed = world.ls_api("GET", f"/api/tasks?project={world.pid('A')}&page_size=100")["tasks"]
    world.s3_task = max(t["id"] for t in listed)
    ml = world.ls_api(
        "POST",
        "/api/ml",
        json={"url": world.url, "project": world.pid("A"), "title": "cosod hostile", "is_interactive": True},
    )
    world.ml["A"] = int(ml["id"])
    # genuine corrections through Label Studio's own webhook: three tasks of A
    for tid in world.tasks["A"][:3]:
        annotate(world, tid, seed=tid)
    deadline = time.monotonic() + 30
    while len(read_corrections(world.model_dir, world.pid("A"))) < 3:
        if time.monotonic() > deadline:
            raise RuntimeError(f"genuine corrections not stored; backend log: {world.log}")
        time.sleep(0.2)
    world.genuine = read_corrections(world.model_dir, world.pid("A"))
    # C: a project Label Studio has and the backend has never been told about
    world.projects["C"], tc = create_grouped_project(ls, {"hxc": 2}, title="hostile C")
    world.tasks["C"], world.configs["C"] = sorted(tc), grouped
    # E: the target of label-config amplification
    world.projects["E"], te = create_grouped_project(ls, {"hxe": 1}, title="hostile E")
    world.tasks["E"], world.configs["E"] = sorted(te), grouped
    _setup(world, "E")
    _remember_data(world)
    _warm(world)


def _remember_data(world: World) -> None:
    """Each task's data as Label Studio holds it (the cases send it back as their task's data)."""
    data = world.scratch.setdefault("data", {})
    for pid in world.projects.values():
        for t in world.ls_api("GET", f"/api/tasks?project={pid}&page_size=1000")["tasks"]:
            data[int(t["id"])] = t["data"]


def _warm(world: World) -> None:
    """One real prediction, so that the caches and allocator are warm before RSS is measured."""
    tid = world.tasks["B"][0]
    task = world.ls_api("GET", f"/api/tasks/{tid}")
    r = world.session.post(
        f"{world.url}/predict",
        json={"tasks": [{"id": tid, "data": task["data"]}], "project": f"{world.pid('B')}.1795340308"},
        auth=world.auth,
        timeout=120,
    )
    r.raise_for_status()


def annotate(world: World, task_id: int, *, seed: int) -> int:
    """A genuine annotation in Label Studio (a brush mask of a random rectangle); returns its id."""
    import numpy as np

    from backend.labelstudio.regions import brush_region

    task = world.ls_api("GET", f"/api/tasks/{task_id}")
    from PIL import Image

    media = requests.get(
        world.ls.url + task["data"]["image"], headers={"Authorization": f"Token {world.ls.token}"}, timeout=60
    )
    w, h = Image.open(io.BytesIO(media.content)).size
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), bool)
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    mask[y : y + h // 3, x : x + w // 3] = True
    region = brush_region(mask, from_name="tag", to_name="image", label="Object", score=1.0, rid=f"g{seed}")
    region.pop("score")
    created = world.ls_api("POST", f"/api/tasks/{task_id}/annotations", json={"result": [region]})
    return int(created["id"])


def wait_stored(world: World, project: int, annotation_id: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if world.stored(project, annotation_id) is not None:
            return True
        time.sleep(0.2)
    return False


def healthy_json_keys(reply: Reply) -> Mapping[str, Any]:
    data = reply.json()
    return data if isinstance(data, dict) else {}
