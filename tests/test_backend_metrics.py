"""backend/metrics.py: the declared series, one registry per app, and the multiprocess sum.

The multiprocess tests run other processes (prometheus_client picks its mode at import, from
PROMETHEUS_MULTIPROC_DIR): plain interpreters that count, and real gunicorn with two workers and
``backend/api/gunicorn_conf.py``. No Redis, no Label Studio.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from backend.api.app import create_app
from backend.metrics import CONTENT_TYPE, LATENCY_BUCKETS, MULTIPROC_ENV, Metrics, VersionsCollector
from backend.settings import Settings

REPO = Path(__file__).resolve().parents[1]
BRUSH = (REPO / "label_config" / "brush.xml").read_text()

# family -> (type, label names, HELP): what dashboards and alerts rely on.
SERIES = {
    "cosod_requests": ("counter", {"method", "route", "status"}, "HTTP requests by route and status code"),
    "cosod_request_seconds": ("histogram", {"route"}, "HTTP request latency by route"),
    "cosod_errors": (
        "counter",
        {"kind"},
        "errors by kind (bad_request, image_refused, image_unreadable, ...)",
    ),
    "cosod_group_cache_hits": ("counter", set(), "group results served from the cache"),
    "cosod_group_cache_misses": ("counter", set(), "group results computed"),
    "cosod_group_images": ("counter", set(), "images passed to the pipeline in group computations"),
    "cosod_predicted_tasks": ("counter", set(), "tasks answered by /predict"),
    "cosod_webhook_events": ("counter", {"action"}, "webhook events received by action"),
    "cosod_pipeline_seconds": (
        "histogram",
        set(),
        "time of one group computation (images fetched + predicted)",
    ),
    "cosod_backbone_ready": ("gauge", set(), "1 when the backbone is loaded and predictions can be served"),
}


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the Prometheus text format."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str | bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def total(text: str | bytes, name: str, keep: Callable[[Mapping[str, str]], bool] = lambda _: True) -> float:
    """The sum of ``name`` over the label sets that ``keep`` accepts."""
    return sum(v for (n, labels), v in samples(text).items() if n == name and keep(dict(labels)))


def fake_pipeline(settings: Settings) -> Any:
    return SimpleNamespace(config=SimpleNamespace(model=settings.model_name), version_id="fixed")


# -- one process ---------------------------------------------------------------------------------------
def test_every_series_is_declared_with_its_type_labels_and_help() -> None:
    m = Metrics()
    m.requests.labels(method="GET", route="/health", status="200").inc()
    m.request_seconds.labels(route="/health").observe(0.01)
    m.errors.labels(kind="internal").inc()
    m.webhook_events.labels(action="ANNOTATION_CREATED").inc()
    text = m.exposition().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels, help_text) in SERIES.items():
        family = families[name]
        assert (family.type, family.documentation) == (kind, help_text), name
        assert {k for s in family.samples for k in s.labels} - {"le"} == labels, name
    assert set(families) == set(SERIES)
    assert "# HELP cosod_requests_total HTTP requests by route and status code\n" in text
    assert value(text, "cosod_requests_total", method="GET", route="/health", status="200") == 1
    assert value(text, "cosod_group_cache_hits_total") == 0  # unlabelled series exist from the start


def test_each_instance_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.group_cache_hits.inc(2)
    assert value(a.exposition(), "cosod_group_cache_hits_total") == 2
    assert value(b.exposition(), "cosod_group_cache_hits_total") == 0
    assert not [f.name for f in REGISTRY.collect() if f.name.startswith("cosod_")]


def test_labels_are_checked_at_the_call() -> None:
    m = Metrics()
    with pytest.raises(ValueError):
        m.requests.labels(route="/health").inc()  # method and status missing
    with pytest.raises(ValueError):
        m.predicted_tasks.inc(-1)


def test_histogram_counts_into_the_latency_buckets() -> None:
    m = Metrics()
    for seconds in (0.003, 0.2, 0.2, 200.0):
        m.pipeline_seconds.observe(seconds)
    text = m.exposition()
    buckets = {
        labels[0][1]: v for (n, labels), v in samples(text).items() if n == "cosod_pipeline_seconds_bucket"
    }
    assert sorted(float(le) for le in buckets if le != "+Inf") == list(LATENCY_BUCKETS)
    assert [buckets[le] for le in ("0.005", "0.1", "0.25", "120.0", "+Inf")] == [1, 1, 3, 3, 4]
    assert value(text, "cosod_pipeline_seconds_count") == 4
    assert value(text, "cosod_pipeline_seconds_sum") == pytest.approx(200.403)


def test_versions_are_read_at_each_scrape() -> None:
    projects = [
        {
            "project": 3,
            "active": "v2",
            "versions": [
                {"version": "v1", "scores": {"iou": 0.5}},
                {"version": "v2", "scores": {"iou": 0.75, "note": "text", "flag": True}},
            ],
        }
    ]
    m = Metrics()
    m.add_shared_collector(VersionsCollector(lambda: projects))
    text = m.exposition()
    assert value(text, "cosod_version_active", project="3", version="v1") == 0
    assert value(text, "cosod_version_active", project="3", version="v2") == 1
    assert value(text, "cosod_version_heldout_score", project="3", version="v2", metric="iou") == 0.75
    assert total(text, "cosod_version_heldout_score", lambda labels: labels["metric"] != "iou") == 0
    projects[0]["active"] = "v1"
    projects[0]["versions"] = projects[0]["versions"][:1]
    text = m.exposition()
    assert value(text, "cosod_version_active", project="3", version="v1") == 1
    assert value(text, "cosod_version_active", project="3", version="v2") is None


def test_a_multiprocess_dir_set_after_the_import_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=f"{MULTIPROC_ENV} is set to .* imported without it"):
        Metrics()


def test_app_metrics_after_requests(tmp_path) -> None:
    # images from disk (local files): ready without Label Studio's URL and key
    settings = Settings(model_dir=str(tmp_path), local_files_root=str(tmp_path))
    app = create_app(settings, pipeline_factory=fake_pipeline)
    assert app.extensions["cosod"]["loader"].wait(10)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/health").status_code == 200
    assert client.get("/nope").status_code == 404
    assert client.post("/setup", json={}).status_code == 400
    setup = client.post("/setup", json={"project": "3.1795340308", "schema": BRUSH})
    version = setup.get_json()["model_version"]
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"] == CONTENT_TYPE
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")
    text = r.get_data(as_text=True)
    count = "cosod_requests_total"
    assert value(text, count, method="GET", route="/health", status="200") == 3
    assert value(text, count, method="GET", route="unmatched", status="404") == 1
    assert value(text, count, method="POST", route="/setup", status="400") == 1
    assert value(text, count, method="POST", route="/setup", status="200") == 1
    assert value(text, "cosod_errors_total", kind="http_404") == 1
    assert value(text, "cosod_errors_total", kind="BadRequestError") == 1
    assert value(text, "cosod_request_seconds_count", route="/health") == 3
    assert value(text, "cosod_request_seconds_bucket", route="/health", le="+Inf") == 3
    assert value(text, "cosod_backbone_ready") == 1
    assert version.startswith("scosparc-p3-")  # a base version, not yet in the registry: no series
    assert "# TYPE cosod_version_active gauge" in text and "cosod_version_active{" not in text
    again = client.get("/metrics").get_data(as_text=True)  # the first scrape is counted after it answered
    assert value(again, count, method="GET", route="/metrics", status="200") == 1


# -- several processes ---------------------------------------------------------------------------------
COUNTING_CHILD = """
import os, sys
from backend.metrics import Metrics

m = Metrics()
for _ in range(int(sys.argv[1])):
    m.requests.labels(method="GET", route="/health", status="200").inc()
m.pipeline_seconds.observe(0.2)
m.backbone_ready.set(float(sys.argv[2]))
print(os.getpid())
"""
SCRAPING_CHILD = (
    "import sys; from backend.metrics import Metrics; sys.stdout.buffer.write(Metrics().exposition())"
)


def _python(code: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out


def test_the_collector_sums_the_processes(tmp_path) -> None:
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    children = [_python(COUNTING_CHILD, ["3", "1"], env), _python(COUNTING_CHILD, ["4", "0"], env)]
    ready_pid, loading_pid = (int(_finish(p)) for p in children)
    assert ready_pid != loading_pid

    def collect() -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))
        return generate_latest(registry)

    text = collect()
    assert value(text, "cosod_requests_total", method="GET", route="/health", status="200") == 7
    assert value(text, "cosod_pipeline_seconds_count") == 2
    assert value(text, "cosod_pipeline_seconds_bucket", le="0.25") == 2
    assert value(text, "cosod_backbone_ready") == 0  # livemin: one process is not ready
    mark_process_dead(loading_pid, str(tmp_path))
    assert value(collect(), "cosod_backbone_ready") == 1  # the dead one no longer counts
    assert value(collect(), "cosod_requests_total", method="GET", route="/health", status="200") == 7

    scraped = _finish(_python(SCRAPING_CHILD, [], env))  # what /metrics answers in such a process
    assert value(scraped, "cosod_requests_total", method="GET", route="/health", status="200") == 7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    """One request on a new connection (so that any worker may take it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def _not_scrapes(labels: Mapping[str, str]) -> bool:
    return labels["route"] != "/metrics"


@pytest.mark.slow
def test_gunicorn_with_two_workers_reports_every_request_whichever_worker_answers(tmp_path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    (prom / "counter_1.db").write_bytes(b"stale garbage")  # an earlier run's file: must be removed
    (prom / "keep.txt").write_text("not ours")
    port = _free_port()
    env = {
        **os.environ,
        MULTIPROC_ENV: str(prom),
        "MODEL_DIR": str(tmp_path / "models"),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
    }
    log = (tmp_path / "gunicorn.log").open("w")
    cmd = [sys.executable, "-m", "gunicorn", "-c", "python:backend.api.gunicorn_conf", "--workers", "2"]
    cmd += ["--threads", "2", "--bind", f"127.0.0.1:{port}", "metrics_app:create()"]
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    sent = 0  # answered requests other than /metrics
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "gunicorn.log").read_text()
            try:
                _get(port, "/health")
                sent += 1
                break
            except (ConnectionRefusedError, ConnectionResetError):
                assert time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
                time.sleep(0.1)
        assert not (prom / "counter_1.db").exists() and (prom / "keep.txt").exists()

        paths = ["/health", "/versions", "/nope", "/health"] * 15
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda p: _get(port, p), paths))
        sent += len(answers)
        assert [status for status, _, _ in answers].count(404) == 15

        seen: dict[int, float] = {}  # worker pid -> the request count its /metrics answer gave
        for _ in range(20):
            with ThreadPoolExecutor(4) as pool:
                scrapes = list(pool.map(lambda _: _get(port, "/metrics"), range(8)))
            for status, headers, text in scrapes:
                assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
                seen[int(headers["X-Worker-Pid"])] = total(text, "cosod_requests_total", _not_scrapes)
            if len(seen) == 2:
                break
        assert len(seen) == 2, f"only worker {list(seen)} answered /metrics"
        assert set(seen.values()) == {sent}  # each worker reports every worker's requests
        _, _, text = _get(port, "/metrics")
        assert value(text, "cosod_backbone_ready") == 1  # both workers have answered: both loaded
        assert total(text, "cosod_requests_total", lambda labels: labels["route"] == "unmatched") == 15

        dead = min(seen)  # a killed worker: its live gauge goes, its counts stay
        assert (prom / f"gauge_livemin_{dead}.db").exists()
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (prom / f"gauge_livemin_{dead}.db").exists():
            assert time.monotonic() < deadline, "child_exit did not mark the worker dead"
            time.sleep(0.1)
        assert (prom / f"counter_{dead}.db").exists()
        _, _, text = _get(port, "/metrics")
        assert total(text, "cosod_requests_total", _not_scrapes) == sent
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
            log.close()
    assert (prom / "keep.txt").exists()  # a directory given by the environment is not removed
