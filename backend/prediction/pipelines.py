"""Loads the pipelines once per process, in background threads: the default model (``COSOD_MODEL``) at
start-up, another model the first time a project's extra params ask for it (``{"model": "ums"}``).

Under gunicorn the app is created in each worker after the fork (do not use ``--preload``), so each worker
loads its own copy and no CUDA context exists before a fork. Should the loader still have been started in a
parent process, :meth:`PipelineLoader.ensure_started` notices the new pid and starts again in the child.

**A failed load is retried when its files change**, without a restart: the loader remembers, at the start of
each attempt, the files a load reads (:func:`watched_files`: every file in the weights folder, by name, size
and mtime, and the configured checkpoints). While the load is failed, a request that asks for the pipeline
(``/health``, ``/predict``, ``/setup``, or any request: they all call :meth:`PipelineLoader.ensure_started`)
looks at those files again, at most every ``recheck_every`` seconds (5 by default; nothing runs between
requests). When they differ (a missing weights file was put in place, a corrupt one replaced) the load starts
again: ``failed`` -> ``loading`` -> ``ready`` (or ``failed`` with the new reason). When they are the same, the
failure stands: a corrupt file is not read again until it changes, and a failure the files do not explain
(e.g. no CUDA device) needs a restart.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import NotReadyError
from ..settings import Settings

log = logging.getLogger(__name__)

PipelineFactory = Callable[[Settings], Any]
RECHECK_EVERY = 5.0  # seconds between two looks at a failed load's files
Signature = tuple[tuple[str, int, int], ...]


def weights_folder(settings: Settings) -> Path:
    """The folder the backbones' weights files are read from (``COSOD_WEIGHTS_DIR`` or ``weights/``)."""
    from cosod.paths import weights_dir  # not cosod.backbones: no torch import for a look at a folder

    return weights_dir(settings.weights_dir)


def watched_files(settings: Settings) -> Signature:
    """What a load reads, as ``(path, size, mtime_ns)``: each regular file in the weights folder (not the
    ``.sha256`` sidecars a load writes, nor hidden temp files of a copy in progress) and each configured
    checkpoint (``-1, -1`` when it is missing). Equal signatures: nothing a load reads has changed."""
    out: list[tuple[str, int, int]] = []
    folder = weights_folder(settings)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        names = []
    for name in names:
        if name.startswith(".") or name.endswith(".sha256"):
            continue
        try:
            st = os.stat(folder / name)
        except OSError:
            continue
        if os.path.isfile(folder / name):
            out.append((name, st.st_size, st.st_mtime_ns))
    for path in (settings.stage1_checkpoint, settings.ums_checkpoint):
        if path:
            try:
                st = os.stat(path)
                out.append((path, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((path, -1, -1))
    return tuple(out)


def build_pipeline(settings: Settings) -> Any:
    """The default factory: ``cosod.pipeline.Pipeline.build`` for ``settings.model_name``."""
    from cosod.pipeline import Pipeline, PipelineConfig

    cfg = PipelineConfig(
        model=settings.model_name,
        backbone=settings.backbone,
        max_refs=settings.max_refs,
        stage1_checkpoint=settings.stage1_checkpoint,
        ums_checkpoint=settings.ums_checkpoint,
    )
    return Pipeline.build(
        cfg,
        weights_dir=settings.weights_dir,
        cache_dir=settings.cache_dir,
        device=settings.device,
        crf_workers=settings.crf_workers,
    )


class _Slot:
    """One attempt at loading one model: ``loading`` -> ``ready`` | ``failed`` (with the error's message and
    exception). ``files`` is :func:`watched_files` when the attempt began; ``on_done(slot)`` runs when it
    ends."""

    def __init__(
        self,
        settings: Settings,
        factory: PipelineFactory,
        attempt: int = 1,
        on_done: Callable[[_Slot], None] | None = None,
    ):
        self.settings = settings
        self.attempt = attempt
        self.on_done = on_done
        self.state = "loading"
        self.error: str | None = None
        self.exc: Exception | None = None
        self.pipeline: Any = None
        self.load_seconds: float | None = None
        self.done = threading.Event()
        self.files: Signature = ()  # set by the loading thread before it loads
        self.checked = time.monotonic()  # when the files were last compared with ``files``
        worker = threading.Thread(
            target=self._load, args=(factory,), name="cosod-pipeline-loader", daemon=True
        )
        worker.start()

    def _load(self, factory: PipelineFactory) -> None:
        t0 = time.perf_counter()
        s = self.settings
        log.info("loading the %s pipeline: backbone %s on %s", s.model_name, s.backbone, s.device)
        try:
            self.files = watched_files(s)
            pipe = factory(s)
        except Exception as exc:  # reported by /health and /setup, never raised into a request
            self.error = f"{exc.__class__.__name__}: {exc}"
            self.exc = exc
            self.state = "failed"
            log.error(
                "the %s pipeline could not be loaded: %s (a request loads it again once a file in the "
                "weights folder or a checkpoint appears or changes; no restart needed)",
                s.model_name,
                self.error,
            )
        else:
            self.pipeline = pipe
            self.load_seconds = time.perf_counter() - t0
            self.state = "ready"
            log.info(
                "%s pipeline ready in %.2f s (version %s)",
                s.model_name,
                self.load_seconds,
                getattr(pipe, "version_id", "?"),
            )
        finally:
            self.done.set()
            if self.on_done is not None:
                try:
                    self.on_done(self)
                except Exception:
                    log.exception("a pipeline-load listener failed")


class PipelineLoader:
    """Model name -> its pipeline, each loaded once per process (a failed load is retried when its files
    change; see the module docstring). ``state``, ``error``, ``pipeline``, ``load_seconds`` and ``attempt``
    describe the default model (what ``/health`` reports). ``on_settled(state)`` runs each time a load of
    the default model ends."""

    def __init__(
        self,
        settings: Settings,
        factory: PipelineFactory | None = None,
        *,
        recheck_every: float = RECHECK_EVERY,
    ):
        self.settings = settings
        self.factory = factory or build_pipeline
        self.recheck_every = recheck_every
        self.on_settled: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._slots: dict[str, _Slot] = {}

    def ensure_started(self, model: str | None = None) -> _Slot:
        """The model's current load: started if none is, started again if it failed and its files changed
        since (looked at, at most every ``recheck_every`` seconds)."""
        name = model or self.settings.model_name
        with self._lock:
            if self._pid != os.getpid():  # a fork: nothing loaded in the parent is usable here
                self._pid = os.getpid()
                self._slots = {}
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = self._start(name, 1)
            elif slot.state == "failed" and time.monotonic() - slot.checked >= self.recheck_every:
                slot.checked = time.monotonic()
                if self._changed(slot):
                    log.info("the files of the failed %s load changed: loading it again", name)
                    slot = self._slots[name] = self._start(name, slot.attempt + 1)
            return slot

    @staticmethod
    def _changed(slot: _Slot) -> bool:
        try:
            return watched_files(slot.settings) != slot.files
        except Exception:  # e.g. cosod itself cannot be imported: that failure stands
            return False

    def _start(self, name: str, attempt: int) -> _Slot:
        default = name == self.settings.model_name
        return _Slot(
            self.settings.with_(model_name=name),
            self.factory,
            attempt,
            on_done=self._settled if default else None,
        )

    def _settled(self, slot: _Slot) -> None:
        if self.on_settled is not None:
            self.on_settled(slot.state)

    @property
    def _default(self) -> _Slot:
        return self.ensure_started()

    @property
    def state(self) -> str:
        return self._default.state

    @property
    def error(self) -> str | None:
        return self._default.error

    @property
    def pipeline(self) -> Any:
        return self._default.pipeline

    @property
    def load_seconds(self) -> float | None:
        return self._default.load_seconds

    @property
    def attempt(self) -> int:
        """The default model's load attempt: 1, then one more each time its files changed after a failure."""
        return self._default.attempt

    def fix(self) -> str | None:
        """What to do about the default model's failed load (None unless it failed): for a missing or unfit
        weights file, where to put which file and that it is picked up without a restart; else restart."""
        slot = self._default
        if slot.state != "failed":
            return None
        from cosod.errors import CheckpointError, WeightsInvalidError, WeightsMissingError

        soon = (
            f"a request at least {self.recheck_every:g} s after the last look at the files loads it "
            "(GET /health will do), without a restart"
        )
        exc = slot.exc
        if isinstance(exc, WeightsMissingError):
            how = f"run `cosod weights fetch {exc.name}`" if exc.hub_id else "copy the file there"
            return f"put the weights file at {exc.path} ({how} where the hub is reachable); {soon}"
        if isinstance(exc, (WeightsInvalidError, CheckpointError)):
            return f"replace the file the error names with a good one; {soon}"
        return (
            "fix the cause the error names and restart the backend (a change in the weights folder or the "
            f"checkpoints also starts a new load; {soon})"
        )

    def ready(self, model: str | None = None) -> Any:
        """The model's pipeline if it is loaded, else None (starts its load; never waits)."""
        slot = self.ensure_started(model)
        return slot.pipeline if slot.state == "ready" else None

    def wait(self, timeout: float, model: str | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the load to finish; True when the pipeline is ready."""
        slot = self.ensure_started(model)
        slot.done.wait(timeout)
        return slot.state == "ready"

    def require(self, timeout: float = 0.0, model: str | None = None) -> Any:
        """The pipeline, or NotReadyError saying whether it is still loading or why it failed."""
        slot = self.ensure_started(model)
        if self.wait(timeout, model):
            return slot.pipeline
        name = slot.settings.model_name
        if slot.state == "failed":
            raise NotReadyError(f"the {name} model could not be loaded: {slot.error}")
        raise NotReadyError(
            f"the {name} model (backbone {self.settings.backbone}) is still loading; retry in a moment"
        )
