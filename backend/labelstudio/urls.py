"""Task image references as URLs: the first check of an untrusted reference, and origins.

A reference comes from task data: it may be megabytes long or hold what no codec writes (a lone surrogate
such as ``"\\ud800"`` comes through JSON's ``\\u`` escapes). :func:`url_problem` looks at it before anything
parses it: its length (:data:`MAX_URL_CHARS`) and its characters. :func:`origin` is what "the same host"
means when a token may be sent: scheme, host and port (another port is another origin), the default port
filled in. Messages quote references with :func:`backend.errors.quote`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

MAX_URL_CHARS = 8192  # an image reference (or a redirect's Location) longer than this is refused unparsed
DEFAULT_PORTS = {"http": 80, "https": 443}


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


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, lower-cased, the default port filled in; None for anything
    else: another scheme, no host, an invalid port, or credentials in the URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def host(url: str) -> str:
    """The host[:port] of a URL as written, without any credentials in it (for messages)."""
    return urlsplit(url).netloc.rpartition("@")[2]
