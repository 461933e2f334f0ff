"""Loads the pipelines once per process, in background threads: the default model (``COSOD_MODEL``) at
start-up, another model the first time a project's extra params ask for it (``{"model": "ums"}``).

Under gunicorn the app is created in each worker after the fork (do not use ``--preload``), so each worker
loads its own copy and no CUDA context exists before a fork. Should the loader still have been started in a
parent process, :meth:`PipelineLoader.ensure_started` notices the new pid and starts again in the child.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import NotReadyError
from ..settings import Settings

log = logging.getLogger(__name__)

PipelineFactory = Callable[[Settings], Any]


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
    """One model's load: ``loading`` -> ``ready`` | ``failed`` (with the error's message)."""

    def __init__(self, settings: Settings, factory: PipelineFactory):
        self.settings = settings
        self.state = "loading"
        self.error: str | None = None
        self.pipeline: Any = None
        self.load_seconds: float | None = None
        self.done = threading.Event()
        worker = threading.Thread(
            target=self._load, args=(factory,), name="cosod-pipeline-loader", daemon=True
        )
        worker.start()

    def _load(self, factory: PipelineFactory) -> None:
        t0 = time.perf_counter()
        s = self.settings
        log.info("loading the %s pipeline: backbone %s on %s", s.model_name, s.backbone, s.device)
        try:
            pipe = factory(s)
        except Exception as exc:  # reported by /health and /setup, never raised into a request
            self.error = f"{exc.__class__.__name__}: {exc}"
            self.state = "failed"
            log.error("the %s pipeline could not be loaded: %s", s.model_name, self.error)
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


class PipelineLoader:
    """Model name -> its pipeline, each loaded once per process. ``state``, ``error``, ``pipeline`` and
    ``load_seconds`` describe the default model (what ``/health`` reports)."""

    def __init__(self, settings: Settings, factory: PipelineFactory | None = None):
        self.settings = settings
        self.factory = factory or build_pipeline
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._slots: dict[str, _Slot] = {}

    def ensure_started(self, model: str | None = None) -> _Slot:
        name = model or self.settings.model_name
        with self._lock:
            if self._pid != os.getpid():  # a fork: nothing loaded in the parent is usable here
                self._pid = os.getpid()
                self._slots = {}
            if name not in self._slots:
                self._slots[name] = _Slot(self.settings.with_(model_name=name), self.factory)
            return self._slots[name]

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
