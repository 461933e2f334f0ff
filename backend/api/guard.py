"""What the API checks before a route runs: who may call it, and what a request body may be.

- **Authentication**: with ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set, every route (``/health`` and
  ``/metrics`` included) answers 401 without them. Label Studio sends them on every ML call when the
  connection uses "Basic auth"; its webhooks send them once the project's ``/webhook`` carries an
  ``Authorization`` header (README, "Production"). Without them the server must listen on a loopback address
  only (``backend/api/gunicorn_conf.py`` refuses any other bind unless ``COSOD_ALLOW_NO_AUTH=1``).
- **Bodies**: at most ``COSOD_MAX_BODY_BYTES`` (413 beyond, before reading), a JSON object, plain JSON (no
  ``NaN``/``Infinity``), nested no deeper than Python's parser allows (400 "nested too deeply" instead of a
  RecursionError).
- **Metric labels** come from fixed sets only (:func:`method_label`, :func:`action_label`).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from flask import Request

from ..errors import BadRequestError
from ..labelstudio.protocol import KNOWN_EVENTS
from ..settings import Settings

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def authorized(request: Request, settings: Settings) -> bool:
    """Whether ``request`` may pass: always without basic auth configured, else with the right pair."""
    if not settings.basic_auth:
        return True
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = hmac.compare_digest(
        (auth.username or "").encode("utf-8", "surrogatepass"), (settings.basic_auth_user or "").encode()
    )
    pass_ok = hmac.compare_digest(
        (auth.password or "").encode("utf-8", "surrogatepass"), (settings.basic_auth_pass or "").encode()
    )
    return user_ok and pass_ok


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_object(request: Request, example: str = '{"project": 1}') -> dict[str, Any]:
    """The request body as a JSON object, or :class:`BadRequestError` saying what is wrong with it."""
    want = f"the request body must be a JSON object like {example}"
    data = request.get_data(cache=True)  # bounded by MAX_CONTENT_LENGTH (413 beyond)
    if not data:
        raise BadRequestError(f"{want} (the body is empty)")
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequestError(f"{want}: it is nested too deeply") from None
    except UnicodeDecodeError:
        raise BadRequestError(f"{want}: it is not UTF-8 text") from None
    except ValueError as exc:
        raise BadRequestError(f"{want}: it is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(body, dict):
        raise BadRequestError(f"{want}, got {type(body).__name__}")
    try:  # a lone surrogate ("\\ud800") parses, but no later encode() would take it
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequestError(f"{want}: it has a string with an unpaired UTF-16 surrogate") from None
    return body


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def action_label(action: str) -> str:
    return action if action in KNOWN_EVENTS else "other"
