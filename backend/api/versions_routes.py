"""``POST /versions/promote``: make a registered version of a project the active one (roll back or forward),
as a Flask blueprint. ``cosod-backend promote`` calls it; ``GET /versions`` (in :mod:`.app`) lists the names.

- body ``{"project": N, "version": "<name>"}``. The base model's name (``base`` in ``GET /versions``) rolls
  back to the base model, also before any fine-tune registered it.
- 200 ``{"project", "active": the version, "previous": the version active before, "serving": what
  ``/predict`` uses from now on, "record": {version, status, parent, scores, decision}}``. Every process
  follows at its next request (the active version is read from SQLite). ``serving`` differs from ``active``
  only when the version cannot serve on the current base model (trained on another backbone, or an older
  base model's name): the base model then serves and ``warning`` says so.
- 400 a bad body, 404 an unknown project (no ``/setup`` seen) or version (the answer lists the known ones),
  409 a version whose checkpoint is gone, 503 while the base model is loading. Basic auth as every route.

A fine-tune that is running keeps its own decision: when it ends, it activates its candidate if that beats
the version active then.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from cosod.pipeline import describe

from ..errors import BadRequestError, UnknownVersionError, VersionUnusableError, quote, redact_all
from ..labelstudio.protocol import parse_id
from .guard import json_object

blueprint = Blueprint("versions", __name__)

MAX_VERSION_CHARS = 200


@blueprint.post("/versions/promote")
def promote() -> Response:
    body = json_object(request, '{"project": 1, "version": "scosparc-p1-v2"}')
    unknown = sorted(set(body) - {"project", "version"})
    if unknown:
        raise BadRequestError(f"unknown field(s) {quote(unknown)}; allowed: project, version")
    if "project" not in body or "version" not in body:
        raise BadRequestError(
            "/versions/promote needs 'project' (an id) and 'version' (a name listed by GET /versions)"
        )
    pid = parse_id(body["project"], "'project'")
    version = body["version"]
    if not isinstance(version, str) or not version.strip() or len(version) > MAX_VERSION_CHARS:
        raise BadRequestError(
            f"'version' must be a version name of 1-{MAX_VERSION_CHARS} characters, got {quote(version)}"
        )
    cosod = current_app.extensions["cosod"]
    model, settings = cosod["model"], cosod["settings"]
    project = model.project(pid)  # 404 when no /setup was seen for it
    base = model.loader.require(timeout=2.0, model=project.model)  # 503 while loading
    base_version = model.model_version(pid, base)
    registry = model.registry
    previous = registry.active_name(pid) or base_version
    if registry.get(pid, version) is None:
        if version != base_version:
            known = [r.version for r in registry.list_versions(pid)] or [base_version]
            raise UnknownVersionError(f"project {pid} has no version {quote(version)}; known: {quote(known)}")
        registry.ensure_base(pid, base.config.model, base_version, describe(base.config))
    try:
        rec = registry.promote(pid, version)
    except ValueError as exc:  # registered, but its checkpoint file is gone
        raise VersionUnusableError(str(exc)) from None
    _, serving = registry.serving(pid, base, base_version)
    out: dict[str, Any] = {
        "project": pid,
        "active": rec.version,
        "previous": previous,
        "serving": serving,
        "record": {k: getattr(rec, k) for k in ("version", "status", "parent", "scores", "decision")},
    }
    if serving != rec.version:
        out["warning"] = (
            f"{rec.version} is active but cannot serve on the current base model; {serving} serves "
            "(see the backend log)"
        )
    return jsonify(redact_all(out, settings.secrets, settings.private_paths))
