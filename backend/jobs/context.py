"""What every job function runs with: the process's :class:`JobContext` and Label Studio calls retried.

Faults: every Label Studio call is tried ``COSOD_JOB_ATTEMPTS`` times with exponential backoff
(``COSOD_JOB_BACKOFF`` s, doubling) while Label Studio is unreachable or answers 5xx; after that the job fails
and the queue re-runs it up to ``COSOD_JOB_RETRIES`` times. A permanent fault (unknown project, a label config
without a brush/polygon control, a worker whose model version differs from the job's) fails at once with a
reason naming it. Each group is its own job, so a failed group never undoes the finished ones.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import LabelStudioUnavailableError, TransientJobError, UnknownProjectError
from ..labelstudio.client import LabelStudioClient
from ..prediction import build_model
from ..prediction.adapter import CoSODModel
from ..prediction.pipelines import PipelineLoader
from ..prediction.projects import Project
from ..settings import Settings
from . import queue as jobqueue

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class JobContext:
    """What job functions use: the settings, the pipeline loader, the Label Studio client and the model."""

    settings: Settings
    loader: PipelineLoader
    ls: LabelStudioClient
    model: CoSODModel

    @classmethod
    def of(cls, model: CoSODModel) -> JobContext:
        """The context of a model built by :func:`backend.prediction.build_model`."""
        return cls(model.settings, model.loader, model.ls, model)

    @classmethod
    def from_settings(cls, settings: Settings, pipeline_factory: Any = None) -> JobContext:
        """A worker's context: the model without a fine-tune trigger (workers do not receive webhooks)."""
        return cls.of(build_model(settings, pipeline_factory))


_ctx: tuple[int, JobContext] | None = None
_ctx_lock = threading.Lock()


def install_context(ctx: JobContext) -> None:
    """Make ``ctx`` the process's job context (the app and the worker do this once at start)."""
    global _ctx
    with _ctx_lock:
        _ctx = (os.getpid(), ctx)


def context() -> JobContext:
    """The process's job context; built from the environment on first use when none was installed."""
    global _ctx
    with _ctx_lock:
        if _ctx is None or _ctx[0] != os.getpid():
            _ctx = (os.getpid(), JobContext.from_settings(Settings.from_env()))
        return _ctx[1]


def retrying(ctx: JobContext, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
    """``fn()``, tried ``attempts`` (default COSOD_JOB_ATTEMPTS) times while Label Studio is unavailable."""
    attempts = attempts or ctx.settings.job_attempts
    delay = ctx.settings.job_backoff
    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except LabelStudioUnavailableError as exc:
            last = exc
            if i + 1 < attempts:
                wait = delay * 2**i
                log.warning("%s: %s; attempt %d of %d, next in %.1f s", what, exc, i + 1, attempts, wait)
                jobqueue.set_meta(last_error=str(exc))
                time.sleep(wait)
    raise TransientJobError(f"{what}: {last} (gave up after {attempts} attempts)")


def project_state(ctx: JobContext, project_id: int, attempts: int | None = None) -> Project:
    """The project's state (label config, grouping, model) from MODEL_DIR, else from Label Studio."""
    try:
        return ctx.model.project(project_id)
    except UnknownProjectError:
        pass
    config = retrying(ctx, f"reading project {project_id}", lambda: ctx.ls.label_config(project_id), attempts)
    return ctx.model.project(project_id, config)
