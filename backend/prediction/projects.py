"""Per-project state: the label config and the ML connection's extra params, shared by all workers.

Each project's state lives in memory and in ``MODEL_DIR/projects/<id>.json`` (written atomically), so every
gunicorn worker and a restarted process see the config and extra params (e.g. a ``group_by`` override) that
the latest ``/setup`` delivered, whichever worker received it.

Extra params understood (JSON object in the ML connection's "Extra params"): ``group_by`` (any rule of
:mod:`backend.grouping`, overriding ``COSOD_GROUP_BY``), ``label`` (which ``<Label>`` of the control to
write), ``model`` (``scosparc`` or ``ums``, overriding ``COSOD_MODEL``), ``propagate`` (true or false,
overriding ``COSOD_PROPAGATE``: whether a correction re-predicts the rest of its group), ``absence`` (true or
false, overriding ``COSOD_ABSENCE``: whether images judged without the group's object get no mask, see
:mod:`backend.prediction.absence`) and ``absence_choice`` (the value of the config's "no common object"
``<Choice>``, see :mod:`backend.labelstudio.choices`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosod.atomic import atomic_write

from ..errors import BackendError, BadRequestError, UnknownProjectError, quote
from ..labelstudio.labelconfig import LabelConfig, parse_label_config
from ..learning.corrections import PROJECTS_DIR
from ..settings import MODELS, Settings, parse_group_by

log = logging.getLogger(__name__)


@dataclass
class Project:
    id: int
    label_config: str
    config: LabelConfig
    group_by: str
    extra_params: dict[str, Any] = field(default_factory=dict)
    model: str = "scosparc"
    propagate: bool = True  # a correction queues the propagation job of its group (backend.jobs.propagation)
    absence: bool = False  # the absence decision runs on its groups (backend.prediction.absence)
    stamp: tuple[int, int] | None = None  # (inode, mtime) of its file under MODEL_DIR, once loaded or saved


def parse_extra_params(value: Any) -> dict[str, Any]:
    if value in (None, "", {}):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRequestError(f"extra_params must be a JSON object, got {quote(value)}") from None
    if not isinstance(value, dict):
        raise BadRequestError(f"extra_params must be a JSON object, got {quote(value)}")
    return value


MAX_IN_MEMORY = 1024  # projects kept parsed in memory (LRU); the others are read again from MODEL_DIR


class ProjectRegistry:
    """Project id -> :class:`Project`, backed by one JSON file per project under ``MODEL_DIR``; at most
    :data:`MAX_IN_MEMORY` are kept parsed in memory, so memory does not grow with the number of projects."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._projects: OrderedDict[int, Project] = OrderedDict()
        self._lock = threading.Lock()

    def ids(self) -> list[int]:
        """Every project set up, in memory or on disk."""
        on_disk = set()
        for path in (Path(self.settings.model_dir) / PROJECTS_DIR).glob("*.json"):
            if path.stem.isascii() and path.stem.isdigit():
                on_disk.add(int(path.stem))
        with self._lock:
            return sorted(on_disk | set(self._projects))

    def _remember(self, proj: Project) -> None:
        with self._lock:
            self._projects[proj.id] = proj
            self._projects.move_to_end(proj.id)
            while len(self._projects) > MAX_IN_MEMORY:
                self._projects.popitem(last=False)

    def _project_file(self, project_id: int) -> Path:
        return Path(self.settings.model_dir) / PROJECTS_DIR / f"{project_id}.json"

    def _known(self, project_id: int) -> Project | None:
        """In-memory state, refreshed from MODEL_DIR when another worker (or a restart) wrote a newer one."""
        path = self._project_file(project_id)
        try:
            st = path.stat()
            stamp: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)  # a new inode on every os.replace
        except OSError:
            stamp = None
        with self._lock:
            known = self._projects.get(project_id)
        if stamp is None or (known is not None and known.stamp == stamp):
            return known
        try:
            saved = json.loads(path.read_text())
            proj = self._make(project_id, saved["label_config"], saved.get("extra_params") or {})
        except (OSError, ValueError, KeyError, BackendError) as exc:
            log.warning("ignoring the saved state of project %s (%s): %s", project_id, path, exc)
            return known
        proj.stamp = stamp
        self._remember(proj)
        return proj

    def _make(self, project_id: int, label_config: str, extra: dict[str, Any]) -> Project:
        try:
            group_by = parse_group_by(str(extra.get("group_by", self.settings.group_by)))
        except ValueError as exc:
            raise BadRequestError(f"extra_params: {exc}") from None
        model = str(extra.get("model", self.settings.model_name))
        if model not in MODELS:
            raise BadRequestError(f"extra_params: model must be one of {MODELS}, got {quote(model)}")
        self._check_checkpoint(model)
        propagate = extra.get("propagate", self.settings.propagate)
        if not isinstance(propagate, bool):
            raise BadRequestError(f"extra_params: propagate must be true or false, got {quote(propagate)}")
        absence = extra.get("absence", self.settings.absence)
        if not isinstance(absence, bool):
            raise BadRequestError(f"extra_params: absence must be true or false, got {quote(absence)}")
        choice = extra.get("absence_choice")
        if choice is not None and (not isinstance(choice, str) or not choice.strip()):
            raise BadRequestError(
                f"extra_params: absence_choice must be the value of a <Choice> (a non-empty string), got "
                f"{quote(choice)}"
            )
        label = extra.get("label")
        config = parse_label_config(
            label_config, label=str(label) if label is not None else None, absence_choice=choice
        )
        return Project(project_id, label_config, config, group_by, extra, model, propagate, absence=absence)

    def _check_checkpoint(self, model: str) -> None:
        """A model that cannot run without a checkpoint is refused (400 naming the variable to set) instead
        of failing to load later (503)."""
        from cosod.methods import METHODS

        method = METHODS[model]
        field_name = method.checkpoint_field
        if method.checkpoint_required and field_name and not getattr(self.settings, field_name, None):
            env = (Settings.env_names().get(field_name) or (field_name,))[0]
            raise BadRequestError(
                f"model {model!r} needs a trained checkpoint and {env} is not set: train one "
                f"(cosod train --model {model}) and set {env} to its file, or choose another model"
            )

    def _save(self, proj: Project) -> None:
        """Atomically write the project's config and extra params under MODEL_DIR, for the other workers."""
        path = self._project_file(proj.id)
        state = {"project": proj.id, "label_config": proj.label_config, "extra_params": proj.extra_params}
        try:
            atomic_write(path, lambda f: f.write(json.dumps(state).encode()))
            st = path.stat()
            proj.stamp = (st.st_ino, st.st_mtime_ns)
        except OSError as exc:
            log.warning("cannot save the state of project %s under %s: %s", proj.id, path.parent, exc)

    def get(self, project_id: int, label_config: str | None = None, extra_params: Any = None) -> Project:
        """The project's state, created or updated when a label config or extra params are given.

        It is kept in memory and in ``MODEL_DIR/projects/<id>.json`` so that every gunicorn worker and a
        restarted process use the same config and extra params (e.g. the ``group_by`` override)."""
        known = self._known(project_id)
        if label_config is None:
            if known is None:
                raise UnknownProjectError(
                    f"unknown project {project_id}: no /setup was seen for it "
                    "and the request has no label_config"
                )
            if extra_params is None:
                return known
            label_config = known.label_config
        if extra_params is not None:
            extra = parse_extra_params(extra_params)
        else:
            extra = known.extra_params if known else {}
        if known and known.label_config == label_config and known.extra_params == extra:
            return known
        proj = self._make(project_id, label_config, extra)
        self._save(proj)
        self._remember(proj)
        return proj
