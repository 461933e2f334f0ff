"""The project's webhook to this backend, given the backend's credentials, so that a user needs no script.

Label Studio creates, for each model connection, a project webhook ``<model URL>/webhook`` that sends every
event, but without any credentials (``label_studio/ml/models.py``: ``create_ml_webhook``), while the model
connection itself sends HTTP basic auth. With ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set, every ``/setup``
of a project (Label Studio sends one on connect and before each prediction batch) therefore checks, in the
background, that the project's webhooks whose URL is ``<one of its model URLs>/webhook`` carry
``Authorization: Basic ...`` and adds the header where it is missing or stale (SDK ``webhooks.update``;
needs an API key allowed to edit the project's webhooks). Other webhooks and headers are left as they are.
A project is done once every such webhook has the header; until then (the webhook may be created just after
the first ``/setup``) the next ``/setup`` tries again.
"""

from __future__ import annotations

import base64
import logging
import threading
from typing import Any

from ..errors import quote
from .client import LabelStudioClient

log = logging.getLogger(__name__)


def basic_authorization(user: str, password: str) -> str:
    """The ``Authorization`` header value of HTTP basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def authorize_webhooks(sdk: Any, project_id: int, authorization: str) -> tuple[int, int]:
    """Give the project's model webhooks the header; returns (webhooks found, webhooks changed)."""
    targets = {str(m.url).rstrip("/") + "/webhook" for m in sdk.ml.list(project=project_id) if m.url}
    found = changed = 0
    for hook in sdk.webhooks.list(project=str(project_id)):
        if str(hook.url).rstrip("/") not in targets:
            continue
        found += 1
        headers = dict(hook.headers or {}) if isinstance(hook.headers, dict) else {}
        if headers.get("Authorization") != authorization:
            sdk.webhooks.update(hook.id, headers={**headers, "Authorization": authorization})
            changed += 1
    return found, changed


class WebhookAuthorizer:
    """Runs :func:`authorize_webhooks` once per project and process, in a daemon thread per call."""

    def __init__(self, ls: LabelStudioClient, authorization: str | None):
        self.ls = ls
        self.authorization = authorization
        self._done: set[int] = set()
        self._running: set[int] = set()
        self._lock = threading.Lock()

    def ensure(self, project_id: int) -> threading.Thread | None:
        """Start the check for ``project_id`` unless it is done, running, or there is nothing to do."""
        if not self.authorization or not self.ls.configured:
            return None
        with self._lock:
            if project_id in self._done or project_id in self._running:
                return None
            self._running.add(project_id)
        thread = threading.Thread(
            target=self._run, args=(project_id,), name=f"cosod-webhook-auth-{project_id}", daemon=True
        )
        thread.start()
        return thread

    def _run(self, project_id: int) -> None:
        assert self.authorization is not None
        done = False
        try:
            found, changed = authorize_webhooks(self.ls.sdk(), project_id, self.authorization)
            done = found > 0
            if changed:
                log.info("project %s: %d webhook(s) now send the backend's basic auth", project_id, changed)
            elif not found:
                log.info(
                    "project %s: no webhook to this backend yet; the next /setup looks again", project_id
                )
        except Exception as exc:  # never into a request: Label Studio may refuse (permissions) or be down
            log.warning(
                "project %s: could not give the webhook the backend's credentials (%s); add the header "
                "Authorization: Basic ... in Label Studio > Settings > Webhooks: %s",
                project_id,
                type(exc).__name__,
                quote(str(exc)),
            )
        finally:
            with self._lock:
                self._running.discard(project_id)
                if done:
                    self._done.add(project_id)
