"""Untrusted values (task data, label configs, what Label Studio or a redirect sends) in messages and logs.

Such a value may be megabytes long or hold characters no codec writes (a lone surrogate such as
``"\\ud800"`` comes through JSON's ``\\u`` escapes). Every message and log line of this package that shows one
goes through :func:`quote`: at most :data:`QUOTE_CHARS` characters of it, escaped as ``repr`` escapes them
(control characters and lone surrogates become ``\\x..``/``\\u..``), then how long it was. A message stays
short and always encodes as UTF-8.

:func:`url_problem` is the first check of a reference used as a URL, before anything parses it: its length
(:data:`MAX_URL_CHARS`) and its characters.
"""

from __future__ import annotations

import reprlib
from typing import Any

QUOTE_CHARS = 200  # characters of an untrusted value shown in a message or log line
MAX_URL_CHARS = 8192  # an image reference longer than this is refused before it is parsed

_reprs = reprlib.Repr()
_reprs.maxlevel = 2
_reprs.maxstring = QUOTE_CHARS
_reprs.maxother = QUOTE_CHARS


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """``value`` for a message: a string as ``repr`` of its first ``limit`` characters, followed by
    ``… (N chars)`` when it was longer; anything else as a bounded ``reprlib`` repr of at most ``limit``
    characters (plus ``…``). The result is printable: control characters and lone surrogates are escaped.
    ``quote("a" * 300)`` is ``'aa…a'… (300 chars)`` with 200 ``a``."""
    if isinstance(value, str):
        shown = repr(value[:limit])
        return shown if len(value) <= limit else f"{shown}… ({len(value)} chars)"
    try:
        text = _reprs.repr(value)
    except Exception:  # a hostile __repr__: say what it is, never fail a message
        text = f"<{type(value).__name__}>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "…"


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be used as a URL at all (too long, a control character, a lone surrogate), or None.
    Looks at the length before anything else, so a huge string costs nothing more."""
    if len(url) > MAX_URL_CHARS:
        return f"{len(url)} characters is over the limit of {MAX_URL_CHARS} characters for a URL"
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        return "it holds a lone surrogate (not a Unicode character), so it is no URL"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "it holds a control character"
    return None
