"""Shared fixtures: the real pipeline on the tiny backbone (built once), a fake Label Studio HTTP server."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from http_server import serving


@pytest.fixture(scope="session")
def tiny_pipeline() -> Any:
    """``cosod.pipeline.Pipeline`` with the randomly initialised ``tiny`` backbone (no weights file)."""
    from cosod.pipeline import Pipeline, PipelineConfig

    return Pipeline.build(PipelineConfig(backbone="tiny"), device="cpu")


@dataclass
class FakeLabelStudio:
    """Routes map a path (without query) to ``(status, headers, body bytes)`` or a callable of the query."""

    url: str = ""
    routes: dict[str, Any] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def add_json(self, path: str, payload: Any, status: int = 200) -> None:
        self.routes[path] = (status, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    def add_bytes(
        self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self.routes[path] = (status, headers or {"Content-Type": "application/octet-stream"}, body)

    def add_handler(self, path: str, fn: Callable[[dict[str, list[str]], dict[str, str]], tuple]) -> None:
        self.routes[path] = fn


@pytest.fixture
def fake_ls() -> Iterator[FakeLabelStudio]:
    """A threaded HTTP server on 127.0.0.1 standing in for Label Studio's API and media endpoints."""
    state = FakeLabelStudio()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            parsed = urlparse(self.path)
            headers = {k: v for k, v in self.headers.items()}
            state.seen.append((self.path, headers))
            route = state.routes.get(parsed.path)
            if route is None:
                status, hdrs, body = 404, {"Content-Type": "application/json"}, b'{"detail": "not found"}'
            elif callable(route):
                status, hdrs, body = route(parse_qs(parsed.query), headers)
            else:
                status, hdrs, body = route
            self.send_response(status)
            for k, v in hdrs.items():
                self.send_header(k, v)
            if "Content-Length" not in hdrs:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    with serving(Handler) as url:
        state.url = url
        yield state
