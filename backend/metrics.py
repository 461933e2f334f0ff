"""The backend's Prometheus series, declared once, on ``prometheus_client``; one :class:`Metrics` per app.

Series (all prefixed ``cosod_``; counters end in ``_total``, histograms have ``_bucket``/``_sum``/``_count``):

- ``requests_total{method,route,status}``, ``request_seconds{route}`` (histogram, :data:`LATENCY_BUCKETS`)
- ``errors_total{kind}``, ``webhook_events_total{action}``
- ``group_cache_hits_total``, ``group_cache_misses_total``, ``group_images_total``,
  ``predicted_tasks_total``, ``pipeline_seconds`` (histogram)
- ``backbone_ready`` (gauge, 1 when this process can serve predictions)
- ``version_active{project,version}`` and ``version_heldout_score{project,version,metric}``: read from the
  model registry on disk at each scrape by a :class:`VersionsCollector`, so every process reports the same.

Each :class:`Metrics` owns a ``CollectorRegistry`` (not the library's global one), so many apps in one
process (the tests) neither collide nor share counts.

Several processes behind one port (gunicorn ``--workers N``): set ``PROMETHEUS_MULTIPROC_DIR`` to an empty,
writable directory in the environment that starts the server, before any process imports
``prometheus_client`` (``backend/api/gunicorn_conf.py`` does this, and empties it at start). Every process
then writes its values to ``<dir>/<type>_<pid>.db`` files and :meth:`Metrics.exposition`, whichever process
answers, sums them with ``prometheus_client.multiprocess.MultiProcessCollector``: counters and histograms
are summed over all processes that ever ran since the start (a restarted worker's counts are kept).
``backbone_ready`` uses the ``livemin`` mode: 1 only when every live worker has its backbone loaded, so a
scrape never reports ready while some worker would still answer "loading"; gunicorn's ``child_exit`` hook
(``multiprocess.mark_process_dead``) drops the value of a dead worker. Limits of that mode: values live in
files named by pid, so two :class:`Metrics` in one process share (and overwrite) them; set the variable
only for the API, not for the RQ workers (``cosod-worker`` forks a process per job, whose files would pile
up there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

# No ``<name>_created`` series beside counters and histograms: there were none before, multiprocess mode
# has none, and the text format would make each a gauge series of its own. (A process-wide switch of
# prometheus_client; this module belongs to the app, which owns its process.)
disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
NAMESPACE = "cosod"
# The text format ``generate_latest`` writes. Not ``prometheus_client.CONTENT_TYPE_LATEST``: in the locked
# 0.26 that names version 1.0.0 of the format; nor ``CONTENT_TYPE_PLAIN_0_0_4``, absent from older releases.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# What ``CoSODModel.versions()`` returns: per project {"project", "active", "versions": [{"version",
# "scores": {metric: value}}, ...]}.
VersionsSource = Callable[[], Sequence[Mapping[str, Any]]]


def multiproc_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when set (multiprocess mode), else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def _check_mode() -> str | None:
    """The multiprocess directory, after checking that prometheus_client was imported in the same mode."""
    path = multiproc_dir()
    files_backed = bool(getattr(values.ValueClass, "_multiprocess", False))
    if bool(path) != files_backed:
        state = f"is set to {path!r}" if path else "is unset (or empty)"
        raise RuntimeError(
            f"{MULTIPROC_ENV} {state} but prometheus_client was imported "
            f"{'with' if files_backed else 'without'} it: set it in the environment that starts the "
            "server, before any import (backend/api/gunicorn_conf.py does), and never change it afterwards"
        )
    if path is not None and not os.path.isdir(path):
        raise ValueError(f"{MULTIPROC_ENV}={path!r} is not a directory; create it (empty) before the start")
    return path


class VersionsCollector(Collector):
    """``version_active`` and ``version_heldout_score`` gauges computed at collect time from ``source``.

    They describe files shared by every process (the model registry), not process state, so they are
    collected the same way in single- and multiprocess mode and never go stale.
    """

    def __init__(self, source: VersionsSource):
        self.source = source

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        active = GaugeMetricFamily(
            f"{NAMESPACE}_version_active",
            "1 for the model version a project serves, 0 for its other registered versions",
            labels=("project", "version"),
        )
        score = GaugeMetricFamily(
            f"{NAMESPACE}_version_heldout_score",
            "held-out score of a registered model version, by metric (iou, max_f, mae, ...)",
            labels=("project", "version", "metric"),
        )
        return active, score

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        active, score = self._families()
        for p in self.source():
            for rec in p["versions"]:
                labels = [str(p["project"]), str(rec["version"])]
                active.add_metric(labels, 1.0 if rec["version"] == p["active"] else 0.0)
                for name, value in (rec.get("scores") or {}).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        score.add_metric([*labels, str(name)], float(value))
        return [active, score]


class Metrics:
    """Every series of one app, as typed ``prometheus_client`` objects on the app's own registry.

    Callers use the objects directly, e.g. ``m.requests.labels(method="GET", route="/health",
    status="200").inc()``, ``m.pipeline_seconds.observe(seconds)``, ``m.backbone_ready.set(1)``: a
    misspelt series is an AttributeError and a wrong label set a ValueError at the call, instead of a new,
    undeclared series. :meth:`exposition` gives the text ``/metrics`` answers.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.multiproc_dir = _check_mode()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._shared: list[Collector] = []
        r, ns = self.registry, NAMESPACE
        self.requests = Counter(
            "requests",
            "HTTP requests by route and status code",
            ("method", "route", "status"),
            namespace=ns,
            registry=r,
        )
        self.request_seconds = Histogram(
            "request_seconds",
            "HTTP request latency by route",
            ("route",),
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.errors = Counter(
            "errors",
            "errors by kind (bad_request, image_refused, image_unreadable, ...)",
            ("kind",),
            namespace=ns,
            registry=r,
        )
        self.group_cache_hits = Counter(
            "group_cache_hits", "group results served from the cache", namespace=ns, registry=r
        )
        self.group_cache_misses = Counter(
            "group_cache_misses", "group results computed", namespace=ns, registry=r
        )
        self.group_images = Counter(
            "group_images", "images passed to the pipeline in group computations", namespace=ns, registry=r
        )
        self.predicted_tasks = Counter(
            "predicted_tasks", "tasks answered by /predict", namespace=ns, registry=r
        )
        self.webhook_events = Counter(
            "webhook_events", "webhook events received by action", ("action",), namespace=ns, registry=r
        )
        self.pipeline_seconds = Histogram(
            "pipeline_seconds",
            "time of one group computation (images fetched + predicted)",
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.backbone_ready = Gauge(
            "backbone_ready",
            "1 when the backbone is loaded and predictions can be served",
            namespace=ns,
            registry=r,
            multiprocess_mode="livemin",
        )

    def add_shared_collector(self, collector: Collector) -> None:
        """Add a collector whose values do not depend on the process that collects them (e.g.
        :class:`VersionsCollector`); it is also collected in multiprocess mode, beside the files."""
        self.registry.register(collector)
        self._shared.append(collector)

    def exposition(self) -> bytes:
        """The Prometheus text format (``CONTENT_TYPE``): this registry, or in multiprocess mode the sum of
        every process's files plus the shared collectors."""
        if self.multiproc_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiproc_dir)
        for collector in self._shared:
            registry.register(collector)
        return generate_latest(registry)
