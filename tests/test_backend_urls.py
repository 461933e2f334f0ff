"""backend.labelstudio.urls: the first check of a reference used as a URL, and what an origin is."""

from __future__ import annotations

import pytest

from backend.errors import quote
from backend.labelstudio.urls import MAX_URL_CHARS, host, origin, url_problem


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("/data/upload/" + "a" * MAX_URL_CHARS, "over the limit of 8192 characters"),
        ("/data/upload/\ud800.png", "lone surrogate"),
        ("s3://bucket/\udc80", "lone surrogate"),
        ("/data/upload/a\x00.png", "control character"),
        ("/data/upload/a\r\nX-Header: 1", "control character"),
    ],
)
def test_references_unusable_as_urls(url: str, problem: str) -> None:
    assert problem in (url_problem(url) or "")


def test_ordinary_references_have_no_problem() -> None:
    for url in ("/data/upload/3/a b.png", "s3://bucket/é.png", "/data/local-files/?d=x/y.png"):
        assert url_problem(url) is None
    assert url_problem("/data/upload/" + "a" * (MAX_URL_CHARS - 13)) is None


def test_a_huge_reference_is_judged_by_its_length_alone() -> None:
    url = "/data/upload/" + "\ud800" * 20_000_000
    assert "over the limit" in (url_problem(url) or "")
    shown = quote(url)  # how the messages show it: short, with the length, encodable
    assert len(shown) < 400 and "(20000013 chars)" in shown
    shown.encode("utf-8")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://ls.example:8080/x", ("http", "ls.example", 8080)),
        ("HTTP://LS.Example/x", ("http", "ls.example", 80)),
        ("https://ls.example:443/x", ("https", "ls.example", 443)),
        ("http://127.0.0.1:9091/x", ("http", "127.0.0.1", 9091)),  # another port, another origin
        ("ftp://ls.example/x", None),
        ("file:///etc/passwd", None),
        ("http:///x", None),
        ("http://user:pw@ls.example/x", None),
        ("http://ls.example:99999/x", None),
        ("/data/upload/1/a.png", None),
    ],
)
def test_origins(url: str, expected: object) -> None:
    assert origin(url) == expected


def test_host_drops_credentials() -> None:
    assert host("http://user:pw@ls.example:8080/x") == "ls.example:8080"
