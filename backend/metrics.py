"""A small Prometheus text-format registry: counters, gauges and latency histograms, thread-safe.

Values are per process: with several gunicorn workers each one reports its own (Prometheus sums them when
it scrapes each worker; behind one port it sees whichever worker answers).
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

LabelSet = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str] | None) -> LabelSet:
    return tuple(sorted((labels or {}).items()))


def _fmt(labels: LabelSet, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in items)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(items, esc, strict=True)) + "}"


class Metrics:
    """``inc`` counters, ``set`` gauges, ``observe`` histograms; ``render`` gives the exposition text."""

    def __init__(self, prefix: str = "cosod") -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[LabelSet, float]] = defaultdict(dict)
        self._hist: dict[str, dict[LabelSet, list[float]]] = defaultdict(dict)

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._values[name][_labels(labels)] = float(value)

    def get(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_labels(labels), 0.0)

    def observe(self, name: str, seconds: float, labels: dict[str, str] | None = None) -> None:
        key = _labels(labels)
        with self._lock:
            row = self._hist[name].setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, edge in enumerate(LATENCY_BUCKETS):
                if seconds <= edge:
                    row[i] += 1
            row[-2] += seconds
            row[-1] += 1

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name in sorted(set(self._values) | set(self._hist)):
                full = f"{self.prefix}_{name}"
                kind, text = self._help.get(name, ("histogram" if name in self._hist else "gauge", name))
                lines.append(f"# HELP {full} {text}")
                lines.append(f"# TYPE {full} {kind}")
                for labels, value in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{full}{_fmt(labels)} {value:g}")
                for labels, row in sorted(self._hist.get(name, {}).items()):
                    for edge, count in zip(LATENCY_BUCKETS, row, strict=False):
                        lines.append(f"{full}_bucket{_fmt(labels, (('le', f'{edge:g}'),))} {count:g}")
                    lines.append(f"{full}_bucket{_fmt(labels, (('le', '+Inf'),))} {row[-1]:g}")
                    lines.append(f"{full}_sum{_fmt(labels)} {row[-2]:.6f}")
                    lines.append(f"{full}_count{_fmt(labels)} {row[-1]:g}")
        return "\n".join(lines) + "\n"


def default_metrics() -> Metrics:
    m = Metrics()
    m.describe("requests_total", "counter", "HTTP requests by route and status code")
    m.describe("request_seconds", "histogram", "HTTP request latency by route")
    m.describe(
        "errors_total", "counter", "errors by kind (bad_request, image_refused, image_unreadable, ...)"
    )
    m.describe("group_cache_hits_total", "counter", "group results served from the cache")
    m.describe("group_cache_misses_total", "counter", "group results computed")
    m.describe("group_images_total", "counter", "images passed to the pipeline in group computations")
    m.describe("predicted_tasks_total", "counter", "tasks answered by /predict")
    m.describe("webhook_events_total", "counter", "webhook events received by action")
    m.describe("pipeline_seconds", "histogram", "time of one group computation (images fetched + predicted)")
    m.describe("backbone_ready", "gauge", "1 when the backbone is loaded and predictions can be served")
    return m
