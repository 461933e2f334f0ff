"""The real Redis the tests use (127.0.0.1:6379): one database number per test module, flushed around use."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

HOST = "127.0.0.1:6379"


def url(db: int) -> str:
    return f"redis://{HOST}/{db}"


@contextmanager
def flushed(db: int) -> Iterator[Any]:
    """A client of database ``db``, flushed before and after; the test is skipped when Redis is down."""
    import redis

    client = redis.Redis.from_url(url(db))
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis on {HOST} ({exc})")
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
