"""backend.labelstudio.untrusted: untrusted values in messages are short and always encodable."""

from __future__ import annotations

import json
import logging

import pytest

from backend.labelstudio.untrusted import MAX_URL_CHARS, QUOTE_CHARS, quote, url_problem


def test_a_long_string_is_cut_and_its_length_said() -> None:
    shown = quote("x" * 20_000_000)
    assert shown == repr("x" * QUOTE_CHARS) + "… (20000000 chars)"
    assert len(shown) < QUOTE_CHARS + 30
    assert quote("short") == "'short'"


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "\x00\x1b[31m\n", "é" * 300])
def test_what_no_codec_writes_is_escaped(value: str) -> None:
    shown = quote(value)
    shown.encode("utf-8")  # no UnicodeEncodeError
    assert "\n" not in shown and "\x1b" not in shown
    json.dumps({"error": shown}, ensure_ascii=False).encode("utf-8")


def test_a_logged_lone_surrogate_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        logging.getLogger("test").warning("bad image %s", quote("/data/upload/\ud800.png"))
    caplog.records[0].getMessage().encode("utf-8")
    assert "\\ud800" in caplog.text


def test_other_values_are_bounded_too() -> None:
    assert quote(None) == "None" and quote(12) == "12"
    big = {"image": "y" * 1_000_000, "more": list(range(100_000))}
    assert len(quote(big)) <= QUOTE_CHARS + 1
    assert len(quote(list(range(1_000_000)))) <= QUOTE_CHARS + 1

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert quote(Hostile()).startswith("<Hostile")


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
